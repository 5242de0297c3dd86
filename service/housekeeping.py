"""Housekeeping: what crashes and abandoned requests leave behind is removed, so disk use
is bounded by what users hold.

- Uploads past their expiry: their parts (rows and blobs) are deleted, status `expired`.
- Unfinished writes (`*.partial`) older than the grace period: a crash mid-write.
- Blobs of files no row names, older than the grace period: a crash between the write and
  the row's commit (the grace keeps a write whose row is about to commit).
- Part folders of uploads that are no longer pending.
- Copies of an organization's W&B key handed to attempts whose trainer is gone (the
  trainer's driver deletes its own, unless it was killed or never started), for jobs of the
  last SECRETS_WINDOW_S.

The scheduler's lease holder runs it at start and then every few minutes.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from sqlalchemy import select

from service.db import Database, FileRow, JobRow, UploadPartRow, UploadRow
from service.fine_tuning.lifecycle import TRAINER_MAY_BE_ALIVE
from training.spec import job_folder, wandb_secret_key
from training.storage import ArtifactStore, join

logger = logging.getLogger(__name__)

GRACE_S = 3600.0
EVERY_S = 600.0
SECRETS_WINDOW_S = 30 * 24 * 3600.0


@dataclass
class SweepReport:
    expired_uploads: int = 0
    removed_blobs: int = 0
    removed_secrets: int = 0


class Housekeeping:
    def __init__(
        self,
        db: Database,
        blobs: ArtifactStore,
        clock: Callable[[], float] = time.time,
        grace_s: float = GRACE_S,
    ):
        self.db, self.blobs, self.clock, self.grace_s = db, blobs, clock, grace_s
        self._last = 0.0

    def due(self) -> bool:
        return self.clock() - self._last >= EVERY_S

    def sweep(self) -> SweepReport:
        self._last = self.clock()
        report = SweepReport()
        report.expired_uploads = self._expire_uploads()
        report.removed_secrets = self._forget_secrets()
        old = self.clock() - self.grace_s
        with self.db.session() as session:
            files = set(session.scalars(select(FileRow.blob_key)))
            pending = set(
                session.scalars(select(UploadRow.id).where(UploadRow.status == "pending"))
            )
        for item in self.blobs.list("files"):
            key = item.key
            if item.modified < old and (key.endswith(".partial") or key not in files):
                self.blobs.delete(key)
                report.removed_blobs += 1
        for item in self.blobs.list("uploads"):
            key, upload = item.key, item.key.split("/")[1]
            if (upload not in pending or key.endswith(".partial")) and item.modified < old:
                self.blobs.delete(key)
                report.removed_blobs += 1
        if report.expired_uploads or report.removed_blobs or report.removed_secrets:
            logger.info("housekeeping: %s", report)
        return report

    def _forget_secrets(self) -> int:
        alive = [s.value for s in TRAINER_MAY_BE_ALIVE]
        with self.db.session() as session:
            jobs = session.execute(
                select(JobRow.id, JobRow.attempts, JobRow.integrations).where(
                    JobRow.status.not_in(alive),
                    JobRow.created_at >= self.clock() - SECRETS_WINDOW_S,
                )
            ).all()
        removed = 0
        for job_id, attempts, integrations in jobs:
            if not any(
                isinstance(i, dict) and i.get("type") == "wandb" for i in integrations or []
            ):
                continue
            for number in range(1, attempts + 1):
                key = wandb_secret_key(join(job_folder(job_id), f"attempt-{number}"))
                if self.blobs.exists(key):
                    self.blobs.delete(key)
                    removed += 1
        return removed

    def _expire_uploads(self) -> int:
        with self.db.session() as session:
            expired = list(
                session.scalars(
                    select(UploadRow)
                    .where(UploadRow.status == "pending")
                    .where(UploadRow.expires_at <= self.clock())
                )
            )
            for upload in expired:
                upload.status = "expired"
                for part in session.scalars(
                    select(UploadPartRow).where(UploadPartRow.upload_id == upload.id)
                ):
                    session.delete(part)
        for upload in expired:
            self.blobs.delete(f"uploads/{upload.id}")
        return len(expired)
