"""/v1/files: thin HTTP mapping onto FileService."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated, Literal

from fastapi import APIRouter, Form, Query, UploadFile
from fastapi.responses import StreamingResponse
from openai.types import FileDeleted, FileObject
from pydantic import BaseModel

from service.deps import FilesDep, HeavyDep, TenantDep
from training.storage import CHUNK_BYTES

router = APIRouter(prefix="/v1/files", tags=["files"])


class FileList(BaseModel):
    object: Literal["list"] = "list"
    data: list[FileObject]
    first_id: str | None
    last_id: str | None
    has_more: bool


@router.post("", response_model=FileObject, response_model_exclude_none=True)
async def create_file(
    tenant: TenantDep,
    files: FilesDep,
    heavy: HeavyDep,
    file: UploadFile,
    purpose: Annotated[str, Form()],
) -> FileObject:
    # Off the event loop and the shared threads: copying a spooled upload and validating
    # it line by line take seconds per GB (service/capacity.py).
    name = file.filename or "upload.jsonl"
    return await heavy.files.run(
        tenant.organization, files.create, tenant, name, purpose, file.file
    )


@router.get("", response_model=FileList, response_model_exclude_none=True)
def list_files(
    tenant: TenantDep,
    files: FilesDep,
    purpose: str | None = None,
    limit: Annotated[int, Query(ge=1, le=10_000)] = 10_000,
    order: Literal["asc", "desc"] = "desc",
    after: str | None = None,
) -> FileList:
    data, has_more = files.list(tenant, purpose, limit, order, after)
    return FileList(
        data=data,
        first_id=data[0].id if data else None,
        last_id=data[-1].id if data else None,
        has_more=has_more,
    )


@router.get("/{file_id}", response_model=FileObject, response_model_exclude_none=True)
def retrieve_file(tenant: TenantDep, files: FilesDep, file_id: str) -> FileObject:
    return files.retrieve(tenant, file_id)


@router.delete("/{file_id}", response_model=FileDeleted)
def delete_file(tenant: TenantDep, files: FilesDep, file_id: str) -> FileDeleted:
    return files.delete(tenant, file_id)


@router.get("/{file_id}/content")
def file_content(tenant: TenantDep, files: FilesDep, file_id: str) -> StreamingResponse:
    stream, size = files.content(tenant, file_id)

    def chunks() -> Iterator[bytes]:  # iterated in a worker thread by Starlette
        with stream:
            while chunk := stream.read(CHUNK_BYTES):
                yield chunk

    return StreamingResponse(
        chunks(),
        media_type="application/octet-stream",
        headers={"content-length": str(size)},
    )
