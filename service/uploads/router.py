"""/v1/uploads: thin HTTP mapping onto UploadService."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, UploadFile
from openai.types import Upload
from openai.types.uploads import UploadPart
from pydantic import BaseModel, ConfigDict, Field

from service.deps import HeavyDep, TenantDep, UploadsDep

router = APIRouter(prefix="/v1/uploads", tags=["uploads"])


class ExpiresAfter(BaseModel):
    """OpenAI's bounds: anchored at creation, between one hour and 30 days."""

    model_config = ConfigDict(extra="forbid")
    anchor: Literal["created_at"]
    seconds: Annotated[int, Field(ge=3600, le=2_592_000)]


class CreateUploadRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    filename: str = Field(min_length=1, max_length=512)
    purpose: str
    bytes: int
    mime_type: str = Field(min_length=1, max_length=128)
    expires_after: ExpiresAfter | None = None


class CompleteUploadRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    part_ids: Annotated[list[str], Field(max_length=10_000)]
    md5: str | None = None


@router.post("", response_model=Upload, response_model_exclude_none=True)
def create_upload(tenant: TenantDep, uploads: UploadsDep, request: CreateUploadRequest) -> Upload:
    return uploads.create(
        tenant, request.filename, request.purpose, request.bytes, request.mime_type
    )


@router.post("/{upload_id}/parts", response_model=UploadPart)
async def add_upload_part(
    tenant: TenantDep, uploads: UploadsDep, heavy: HeavyDep, upload_id: str, data: UploadFile
) -> UploadPart:
    # Off the event loop and the shared threads: the part is copied from its spool file.
    return await heavy.files.run(
        tenant.organization, uploads.add_part, tenant, upload_id, data.file
    )


@router.post("/{upload_id}/complete", response_model=Upload, response_model_exclude_none=True)
async def complete_upload(
    tenant: TenantDep,
    uploads: UploadsDep,
    heavy: HeavyDep,
    upload_id: str,
    request: CompleteUploadRequest,
) -> Upload:
    # The parts' assembly and the training file's validation: heavy work.
    return await heavy.files.run(
        tenant.organization, uploads.complete, tenant, upload_id, request.part_ids, request.md5
    )


@router.post("/{upload_id}/cancel", response_model=Upload, response_model_exclude_none=True)
def cancel_upload(tenant: TenantDep, uploads: UploadsDep, upload_id: str) -> Upload:
    return uploads.cancel(tenant, upload_id)
