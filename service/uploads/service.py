"""Uploads: a large file sent in parts, assembled into an ordinary file on completion.

OpenAI's Uploads API: create (declared size, purpose, name), add parts (≤ 64 MB each, any
order), complete (the part order, an optional MD5), or cancel. An upload expires an hour
after creation. The assembled file is validated exactly as a direct upload is.
"""

from __future__ import annotations

from typing import Any, BinaryIO

from openai.types import Upload
from openai.types.uploads import UploadPart
from sqlalchemy import delete, func, select, update
from sqlalchemy.orm import Session

from service.auth import Tenant
from service.db import Database, UploadPartRow, UploadRow, changed_rows, now
from service.errors import InvalidRequest, NotFound
from service.files.service import FileService
from service.ids import file_id, upload_id, upload_part_id
from training.storage import ArtifactStore, BlobTooLarge

MAX_PART_BYTES = 64 * 1024 * 1024
UPLOAD_LIFETIME_S = 3600


def upload_object(row: UploadRow, file: Any = None) -> Upload:
    return Upload.model_validate(
        {
            "id": row.id,
            "object": "upload",
            "bytes": row.bytes,
            "created_at": row.created_at,
            "expires_at": row.expires_at,
            "filename": row.filename,
            "purpose": row.purpose,
            "status": _status(row),
            "file": file,
        }
    )


def _status(row: UploadRow) -> str:
    if row.status == "pending" and now() >= row.expires_at:
        return "expired"
    return row.status


class UploadService:
    def __init__(self, db: Database, blobs: ArtifactStore, files: FileService):
        self.db = db
        self.blobs = blobs
        self.files = files

    def create(
        self, tenant: Tenant, filename: str, purpose: str, size: int, mime_type: str
    ) -> Upload:
        self.files.check_new_file(filename, purpose, filename_param="filename")
        if not 0 < size <= self.files.max_upload_bytes:
            raise InvalidRequest(
                f"bytes must be between 1 and {self.files.max_upload_bytes}", param="bytes"
            )
        created = now()
        row = UploadRow(
            id=upload_id(),
            organization=tenant.organization,
            filename=filename,
            purpose=purpose,
            bytes=size,
            mime_type=mime_type,
            status="pending",
            created_at=created,
            expires_at=created + UPLOAD_LIFETIME_S,
        )
        with self.db.session() as session:
            # Counted and added in one transaction, under the organization's quota row.
            self.files.check_quota(tenant, size, "bytes", session)
            session.add(row)
        return upload_object(row)

    def _pending(self, tenant: Tenant, id_: str) -> UploadRow:
        with self.db.session() as session:
            row = session.get(UploadRow, id_)
        if row is None or row.organization != tenant.organization:
            raise NotFound(f"No such upload: {id_}", param="upload_id")
        if _status(row) != "pending":
            raise self._not_pending(id_, row)
        return row

    @staticmethod
    def _not_pending(id_: str, row: UploadRow | None) -> Exception:
        """What a request for a pending upload answers once it is not (or no longer)."""
        if row is None:  # swept since
            return NotFound(f"No such upload: {id_}", param="upload_id")
        return InvalidRequest(
            f"Upload {id_} is {_status(row)}; only a pending upload takes this action",
            param="upload_id",
        )

    @staticmethod
    def _hold_pending(session: Session, id_: str) -> bool:
        """Lock the upload's row until the transaction ends, if it is still pending: a
        no-op write (PostgreSQL's row lock, SQLite's write lock), so two parts, or a part
        and a completion or cancel, take their turns."""
        return bool(
            changed_rows(
                session.execute(
                    update(UploadRow)
                    .where(UploadRow.id == id_, UploadRow.status == "pending")
                    .values(status=UploadRow.status)
                )
            )
        )

    def add_part(self, tenant: Tenant, id_: str, stream: BinaryIO) -> UploadPart:
        """Blocking (the copy): the route runs it in a worker thread. The parts together
        may not hold more than the upload declared."""
        upload = self._pending(tenant, id_)
        part = UploadPartRow(id=upload_part_id(), upload_id=upload.id, created_at=now(), bytes=0)
        part.blob_key = f"uploads/{upload.id}/{part.id}"
        room = upload.bytes - self._stored_bytes(upload.id)
        try:
            part.bytes = self.blobs.put_file(part.blob_key, stream, min(MAX_PART_BYTES, room))
        except BlobTooLarge:
            raise InvalidRequest(
                f"A part may be at most {MAX_PART_BYTES} bytes, and the parts together at "
                f"most the {upload.bytes} bytes the upload was created for ({room} left)",
                param="data",
            ) from None
        refusal: Exception | None = None
        with self.db.session() as session:
            # Under the upload's lock: the room counted is the room left when this part
            # is added (two parts racing for the last room: one gets it).
            if not self._hold_pending(session, upload.id):  # completed or cancelled since
                refusal = self._not_pending(id_, session.get(UploadRow, upload.id))
            elif self._stored_bytes(upload.id, session) + part.bytes > upload.bytes:
                refusal = InvalidRequest(
                    f"The parts would hold more than the {upload.bytes} bytes the upload "
                    "was created for",
                    param="data",
                )
            else:
                session.add(part)
        if refusal is not None:
            self.blobs.delete(part.blob_key)
            raise refusal
        return UploadPart(
            id=part.id, object="upload.part", created_at=part.created_at, upload_id=upload.id
        )

    def _stored_bytes(self, upload_id: str, session: Session | None = None) -> int:
        query = select(func.coalesce(func.sum(UploadPartRow.bytes), 0)).where(
            UploadPartRow.upload_id == upload_id
        )
        if session is not None:
            return int(session.scalar(query) or 0)
        with self.db.session() as own:
            return int(own.scalar(query) or 0)

    def complete(self, tenant: Tenant, id_: str, part_ids: list[str], md5: str | None) -> Upload:
        upload = self._pending(tenant, id_)
        with self.db.session() as session:
            parts = {
                p.id: p
                for p in session.scalars(
                    select(UploadPartRow).where(UploadPartRow.upload_id == upload.id)
                )
            }
        unknown = [p for p in part_ids if p not in parts]
        if not part_ids or unknown or len(set(part_ids)) != len(part_ids):
            raise InvalidRequest(
                f"part_ids must list this upload's parts once each (unknown: {unknown})",
                param="part_ids",
            )
        total = sum(parts[p].bytes for p in part_ids)
        if total != upload.bytes:
            raise InvalidRequest(
                f"The parts hold {total} bytes, but the upload was created for {upload.bytes}",
                param="part_ids",
            )
        new_id = file_id()
        key = f"files/{new_id}"
        try:
            _, digest = self.blobs.put_concatenation(key, [parts[p].blob_key for p in part_ids])
        except FileNotFoundError:  # a racing completion (or cancel) won and removed the parts
            self.blobs.delete(key)
            raise self._no_longer_pending(id_) from None
        if md5 is not None and md5.lower() != digest:
            self.blobs.delete(key)
            raise InvalidRequest(f"md5 {md5} does not match the parts' {digest}", param="md5")
        file = self.files.register(
            tenant,
            new_id,
            key,
            upload.filename,
            upload.purpose,
            upload.bytes,
            counted_bytes=upload.bytes,  # still pending: its bytes are already counted
        )
        with self.db.session() as session:
            # Compare-and-set: of two completions racing, one wins; the other's file goes.
            won = changed_rows(
                session.execute(
                    update(UploadRow)
                    .where(UploadRow.id == upload.id, UploadRow.status == "pending")
                    .values(status="completed", file_id=new_id)
                )
            )
            if won:
                session.execute(delete(UploadPartRow).where(UploadPartRow.upload_id == upload.id))
        if not won:
            self.files.remove(new_id)
            raise self._no_longer_pending(id_)
        self.blobs.delete(f"uploads/{upload.id}")
        upload.status, upload.file_id = "completed", new_id
        return upload_object(upload, file.model_dump())

    @staticmethod
    def _no_longer_pending(id_: str) -> InvalidRequest:
        return InvalidRequest(
            f"Upload {id_} was completed or cancelled by another request", param="upload_id"
        )

    def cancel(self, tenant: Tenant, id_: str) -> Upload:
        """A compare-and-set, as completion is: a cancel that loses to a completion (or
        another cancel) answers as one that came after it, and changes nothing."""
        upload = self._pending(tenant, id_)
        with self.db.session() as session:
            won = changed_rows(
                session.execute(
                    update(UploadRow)
                    .where(UploadRow.id == upload.id, UploadRow.status == "pending")
                    .values(status="cancelled")
                )
            )
            if not won:
                refusal = self._not_pending(id_, session.get(UploadRow, upload.id))
            else:
                refusal = None
                session.execute(delete(UploadPartRow).where(UploadPartRow.upload_id == upload.id))
        if refusal is not None:
            raise refusal
        self.blobs.delete(f"uploads/{upload.id}")
        upload.status = "cancelled"
        return upload_object(upload)
