"""Files: store an upload, validate it line by line, and answer for it per organization."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext
from typing import TYPE_CHECKING, BinaryIO

from openai.types import FileDeleted, FileObject
from sqlalchemy import delete, literal, select, tuple_
from sqlalchemy.orm import Session

from service.auth import Tenant
from service.db import Database, FileRow, changed_rows, now
from service.errors import InvalidRequest, NotFound, QuotaExceeded
from service.files.validator import validate_here
from service.ids import file_id
from training.data.validation import ValidationReport
from training.storage import ArtifactStore, BlobTooLarge

if TYPE_CHECKING:
    from service.organization.limits import Limits

FINE_TUNE_PURPOSES = {"fine-tune"}
MAX_FILENAME_CHARS = 512  # the store's column (PostgreSQL enforces it)
ACCEPTED_PURPOSES = {"fine-tune", "assistants", "batch", "vision", "user_data", "evals"}


def file_object(row: FileRow) -> FileObject:
    return FileObject(
        id=row.id,
        object="file",
        bytes=row.bytes,
        created_at=row.created_at,
        filename=row.filename,
        purpose=row.purpose,  # type: ignore[arg-type]
        status=row.status,  # type: ignore[arg-type]
        status_details=row.status_details,
        expires_at=None,
    )


class FileService:
    def __init__(
        self,
        db: Database,
        blobs: ArtifactStore,
        max_upload_bytes: int,
        validate: Callable[[str, str], ValidationReport] = validate_here,
        limits: Limits | None = None,
    ):
        self.db = db
        # Quotas per organization (service/organization/limits.py); None: unlimited.
        self.limits = limits
        self.blobs = blobs
        self.max_upload_bytes = max_upload_bytes
        # The app validates in a worker process (service/files/validator.py).
        self.validate = validate

    @staticmethod
    def check_new_file(filename: str, purpose: str, filename_param: str = "file") -> None:
        """What a file must be before any byte is stored (uploads check it at creation)."""
        if not 0 < len(filename) <= MAX_FILENAME_CHARS:
            raise InvalidRequest(
                f"The file name must be 1 to {MAX_FILENAME_CHARS} characters long",
                param=filename_param,
            )
        if purpose not in ACCEPTED_PURPOSES:
            raise InvalidRequest(
                f"'{purpose}' is not one of {sorted(ACCEPTED_PURPOSES)} - 'purpose'",
                param="purpose",
            )
        if purpose in FINE_TUNE_PURPOSES and not filename.lower().endswith(".jsonl"):
            raise InvalidRequest(
                f"Invalid file format for Fine-Tuning API. Must be .jsonl (got '{filename}')",
                param=filename_param,
            )

    def create(self, tenant: Tenant, filename: str, purpose: str, stream: BinaryIO) -> FileObject:
        """Blocking (copy and validation): the route runs it in a worker thread."""
        self.check_new_file(filename, purpose)
        self.check_quota(tenant, 0, param="file")  # before a byte is stored
        new_id = file_id()
        key = f"files/{new_id}"
        try:
            size = self.blobs.put_file(key, stream, self.max_upload_bytes)
        except BlobTooLarge:
            raise InvalidRequest(
                f"File is larger than the {self.max_upload_bytes} byte limit", param="file"
            ) from None
        return self.register(tenant, new_id, key, filename, purpose, size)

    def check_quota(
        self, tenant: Tenant, adding_bytes: int, param: str, session: Session | None = None
    ) -> None:
        if self.limits is None:
            return
        with nullcontext(session) if session is not None else self.db.session() as counting:
            self.limits.check_storage(counting, tenant.organization, adding_bytes, param)

    def register(
        self,
        tenant: Tenant,
        new_id: str,
        key: str,
        filename: str,
        purpose: str,
        size: int,
        counted_bytes: int = 0,
    ) -> FileObject:
        """Record a stored blob as a file, validating training data line by line.
        `counted_bytes`: what the quota already holds for it (a pending upload's)."""
        row = FileRow(
            id=new_id,
            created_at=now(),
            organization=tenant.organization,
            filename=filename,
            purpose=purpose,
            bytes=size,
            status="uploaded",
            blob_key=key,
        )
        if purpose in FINE_TUNE_PURPOSES:
            self._validate_training_file(row)
        else:
            row.status = "processed"
        try:
            with self.db.session() as session:
                self.check_quota(tenant, size - counted_bytes, "file", session)
                session.add(row)
        except QuotaExceeded:
            self.blobs.delete(key)
            raise
        return file_object(row)

    def _validate_training_file(self, row: FileRow) -> None:
        report = self.validate(self.blobs.url, row.blob_key)
        row.status = "processed" if report.ok else "error"
        row.status_details = None if report.ok else report.summary()
        row.n_examples = report.n_examples
        row.data_format = report.data_format

    def get_row(self, tenant: Tenant, id_: str) -> FileRow:
        with self.db.session() as session:
            row = session.get(FileRow, id_)
        if row is None or row.organization != tenant.organization:
            raise NotFound(f"No such File object: {id_}", param="file_id")
        return row

    def retrieve(self, tenant: Tenant, id_: str) -> FileObject:
        return file_object(self.get_row(tenant, id_))

    def list(
        self, tenant: Tenant, purpose: str | None, limit: int, order: str, after: str | None
    ) -> tuple[list[FileObject], bool]:
        with self.db.session() as session:
            query = select(FileRow).where(FileRow.organization == tenant.organization)
            if purpose:
                query = query.where(FileRow.purpose == purpose)
            descending = order == "desc"
            # (arrival, id): two rows that arrived in the same nanosecond (two API
            # processes) still have one order, and a page never skips either.
            key = tuple_(FileRow.arrival, FileRow.id)
            query = query.order_by(
                *(
                    (FileRow.arrival.desc(), FileRow.id.desc())
                    if descending
                    else (FileRow.arrival, FileRow.id)
                )
            )
            if after:
                anchor = session.get(FileRow, after)
                if anchor is None or anchor.organization != tenant.organization:
                    raise NotFound(f"No such File object: {after}", param="after")
                bound = tuple_(literal(anchor.arrival), literal(anchor.id))
                query = query.where(key < bound if descending else key > bound)
            rows = list(session.scalars(query.limit(limit + 1)))
        return [file_object(r) for r in rows[:limit]], len(rows) > limit

    def delete(self, tenant: Tenant, id_: str) -> FileDeleted:
        row = self.get_row(tenant, id_)
        if not self.remove(row.id):  # a concurrent delete got there first
            raise NotFound(f"No such File object: {id_}", param="file_id")
        return FileDeleted(id=row.id, object="file", deleted=True)

    def remove(self, id_: str) -> bool:
        """Delete the file's row, then its blob; whether this call deleted it."""
        with self.db.session() as session:
            row = session.get(FileRow, id_)
            if row is None:
                return False
            key = row.blob_key
            if changed_rows(session.execute(delete(FileRow).where(FileRow.id == id_))) == 0:
                return False
        self.blobs.delete(key)
        return True

    def content(self, tenant: Tenant, id_: str) -> tuple[BinaryIO, int]:
        """The file's bytes as a stream (from the artifact store), and their number."""
        row = self.get_row(tenant, id_)
        return self.blobs.open(row.blob_key), row.bytes
