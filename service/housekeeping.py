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
- The outputs of jobs that failed or were cancelled (their checkpoints, with optimizer
  state, and logs), a while after they ended (`unfinished_outputs_days`): no model was made
  from them, and nothing else would ever delete them. Their checkpoints are served by name
  until then, so serving drops them first and the files go last (`expired_outputs`, then
  `delete_outputs`).
- What a crash left between a commit and the deletes that follow it (review L4), the same
  way (serving first, files last): the outputs of a job whose tuned model was deleted;
  checkpoints of an ended job that no row lists (pruned, or deleted by name), found when
  its outputs are measured; and imported adapters no model names (a deleted import, or
  one half-written), older than the grace period.

The scheduler's lease holder runs it at start and then every few minutes.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from sqlalchemy import and_, delete, literal, or_, select
from sqlalchemy.orm import Session, aliased

from service.db import CheckpointRow, Database, FileRow, JobRow, ModelRow, UploadPartRow, UploadRow
from service.fine_tuning.attempt_store import AttemptStore
from service.fine_tuning.lifecycle import TERMINAL, TRAINER_MAY_BE_ALIVE, JobStatus
from service.fine_tuning.naming import checkpoint_model_name
from training.spec import job_folder
from training.storage import ArtifactStore, StoredObject, join

logger = logging.getLogger(__name__)

GRACE_S = 3600.0
EVERY_S = 600.0
SECRETS_WINDOW_S = 30 * 24 * 3600.0


DAY_S = 24 * 3600.0
TERMINAL_VALUES = [status.value for status in TERMINAL]
# Jobs whose outputs one sweep deletes at most (the rest wait for the next).
EXPIRE_BATCH = 100
# A checkpoint's folder, from any key in it: jobs/<job>/attempt-<n>/checkpoints/step-<step>
CHECKPOINT_FOLDER = re.compile(r"^(jobs/[^/]+/attempt-\d+/checkpoints/step-\d+)/")
IMPORTED = "imported"  # imported adapters: imported/<id>/adapter (service/models/service.py)


@dataclass(frozen=True)
class ExpiredOutputs:
    """Outputs no longer kept: names for serving to drop first, then files to delete.
    `folders` empty: the whole job's outputs (a failed or cancelled job's after their
    time, a deleted model's), marked as gone once deleted; else only those folders."""

    job_id: str | None
    base_model: str | None
    names: list[str]
    folders: list[str] = field(default_factory=list)


@dataclass
class SweepReport:
    expired_uploads: int = 0
    removed_blobs: int = 0
    removed_secrets: int = 0
    measured_jobs: int = 0


class Housekeeping:
    def __init__(
        self,
        db: Database,
        blobs: ArtifactStore,
        clock: Callable[[], float] = time.time,
        grace_s: float = GRACE_S,
        unfinished_outputs_days: float = 7.0,
    ):
        self.db, self.blobs, self.clock, self.grace_s = db, blobs, clock, grace_s
        self.attempts = AttemptStore(blobs)
        self.outputs_ttl_s = unfinished_outputs_days * DAY_S
        self._last = 0.0
        self._orphans: list[ExpiredOutputs] = []  # found by the sweep, for expired_outputs

    def due(self) -> bool:
        return self.clock() - self._last >= EVERY_S

    def sweep(self) -> SweepReport:
        self._last = self.clock()
        report = SweepReport()
        report.expired_uploads = self._expire_uploads()
        report.removed_secrets = self._forget_secrets()
        report.measured_jobs = self._measure_outputs()
        self._find_orphaned_imports()
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
        if (
            report.expired_uploads
            or report.removed_blobs
            or report.removed_secrets
            or report.measured_jobs
        ):
            logger.info("housekeeping: %s", report)
        return report

    def _measure_outputs(self) -> int:
        """What finished jobs' outputs hold in the store, for the storage quota (measured
        once, and again after a deletion shrank them)."""
        with self.db.session() as session:
            jobs = list(
                session.scalars(
                    select(JobRow.id)
                    .where(
                        JobRow.status.in_(TERMINAL_VALUES),
                        JobRow.output_bytes.is_(None),
                        JobRow.outputs_expired_at.is_(None),
                    )
                    .limit(EXPIRE_BATCH)
                )
            )
        for job_id in jobs:
            stored = list(self.blobs.list(job_folder(job_id)))
            with self.db.session() as session:
                job = session.get(JobRow, job_id)
                if job is not None and job.output_bytes is None:
                    job.output_bytes = sum(item.size for item in stored)
                    self._find_orphaned_checkpoints(session, job, stored)
        return len(jobs)

    def _find_orphaned_checkpoints(
        self, session: Session, job: JobRow, stored: list[StoredObject]
    ) -> None:
        """Checkpoint folders of an ended job that no row lists: pruned or deleted by name,
        their files kept by a crash (or by a trainer stopped before it reported them)."""
        if job.fine_tuned_model and session.get(ModelRow, job.fine_tuned_model) is None:
            return  # its model was deleted: all its outputs go (`expired_outputs`)
        listed = set(
            session.scalars(select(CheckpointRow.path).where(CheckpointRow.job_id == job.id))
        )
        folders = {
            match.group(1)
            for item in stored
            if (match := CHECKPOINT_FOLDER.match(item.key)) is not None
        }
        orphaned = sorted(
            folder
            for folder in folders - listed
            if not self._trained_on(session, folder)  # a job on top of it reads it again
        )
        if not orphaned:
            return
        names = []
        if job.fine_tuned_model is not None:
            names = [
                checkpoint_model_name(job.fine_tuned_model, int(folder.rsplit("-", 1)[1]))
                for folder in orphaned
            ]
        self._orphans.append(ExpiredOutputs(job.id, job.model, names, orphaned))

    @staticmethod
    def _trained_on(session: Session, folder: str) -> bool:
        """Whether a job that has not ended trains on top of what is in `folder`."""
        child = select(JobRow.id).where(
            JobRow.start_adapter.startswith(folder + "/"),
            JobRow.status.not_in(TERMINAL_VALUES),
        )
        return session.scalar(child.limit(1)) is not None

    def _find_orphaned_imports(self) -> None:
        """Imported adapters' folders no model names, untouched for the grace period."""
        newest: dict[str, float] = {}
        for item in self.blobs.list(IMPORTED):
            folder = join(*item.key.split("/")[:2])
            newest[folder] = max(newest.get(folder, 0.0), item.modified)
        old = self.clock() - self.grace_s
        candidates = [folder for folder, modified in newest.items() if modified < old]
        if not candidates:
            return
        with self.db.session() as session:
            named = {
                join(*key.split("/")[:2])
                for key in session.scalars(
                    select(ModelRow.adapter_dir).where(ModelRow.adapter_dir.startswith(IMPORTED))
                )
            }
        orphaned = [folder for folder in candidates if folder not in named]
        if orphaned:
            self._orphans.append(ExpiredOutputs(None, None, [], orphaned))

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
            # attempt + 1: its key is handed over before the intent commits, and the commit
            # may lose to a cancel, leaving `attempts` where it was (review L2).
            for number in range(1, attempts + 2):
                removed += self.attempts.forget_secret(job_id, number)
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

    def expired_outputs(self) -> list[ExpiredOutputs]:
        """Jobs that failed or were cancelled long enough ago (a batch of them): serving
        drops their checkpoints, then `delete_outputs` deletes each."""
        ended = [JobStatus.FAILED.value, JobStatus.CANCELLED.value]
        child = aliased(JobRow)
        expired_unfinished = and_(
            JobRow.status.in_(ended), JobRow.finished_at <= self.clock() - self.outputs_ttl_s
        )
        # Its model was deleted, and the deletion's own file delete did not happen (a
        # crash) or is under way (done twice, harmlessly).
        model_deleted = and_(
            JobRow.status == JobStatus.SUCCEEDED.value, JobRow.fine_tuned_model.is_not(None)
        )
        with self.db.session() as session:
            jobs = session.scalars(
                select(JobRow)
                .where(
                    or_(expired_unfinished, model_deleted),
                    JobRow.outputs_expired_at.is_(None),
                    ~select(ModelRow.id).where(ModelRow.job_id == JobRow.id).exists(),
                    # A job that trains on top of one of its checkpoints reads it again on
                    # every attempt: kept until that one ends.
                    ~select(child.id)
                    .where(
                        child.start_adapter.startswith(literal("jobs/") + JobRow.id + "/"),
                        child.status.not_in(TERMINAL_VALUES),
                    )
                    .exists(),
                )
                .order_by(JobRow.finished_at)
                .limit(EXPIRE_BATCH)
            ).all()
            expired, self._orphans = self._orphans, []
            for job in jobs:
                names = list(
                    session.scalars(
                        select(CheckpointRow.model_name).where(CheckpointRow.job_id == job.id)
                    )
                )
                if job.fine_tuned_model is not None:
                    names.append(job.fine_tuned_model)
                expired.append(ExpiredOutputs(job.id, job.model, names))
        return expired

    def delete_outputs(self, expired: ExpiredOutputs) -> None:
        """Once serving has dropped its names (each replica refuses them from then on):
        the folders given, or all the job's outputs, their rows and the mark that they are
        gone."""
        if expired.folders:
            for folder in expired.folders:
                self.blobs.delete(folder)
            logger.info("housekeeping: deleted %s, which nothing lists", expired.folders)
            return
        assert expired.job_id is not None
        with self.db.session() as session:
            session.execute(delete(CheckpointRow).where(CheckpointRow.job_id == expired.job_id))
        self.attempts.delete_job(expired.job_id)
        with self.db.session() as session:
            job = session.get(JobRow, expired.job_id)
            if job is not None:
                job.outputs_expired_at, job.output_bytes = int(self.clock()), 0
        logger.info("housekeeping: deleted the outputs of %s", expired.job_id)
