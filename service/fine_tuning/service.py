"""Fine-tuning jobs: accept, list, control, and report them, per organization."""

from __future__ import annotations

import builtins
import secrets
from collections.abc import Callable
from typing import Any

from openai.types.fine_tuning import FineTuningJobEvent
from sqlalchemy import select
from sqlalchemy.orm import Session

from service.auth import Tenant
from service.config import BaseModelConfig
from service.db import Database, EventRow, FileRow, JobRow, now
from service.errors import InvalidRequest, NotFound
from service.fine_tuning.lifecycle import JobStatus, transition
from service.fine_tuning.schemas import CreateFineTuningJobRequest, FineTuningJobObject
from service.ids import event_id, job_id, model_short_id

# Stops the Ray job behind a job; given by the app (the scheduler owns Ray).
StopTraining = Callable[[JobRow], None]


def add_event(
    session: Session,
    job: JobRow,
    message: str,
    *,
    level: str = "info",
    event_type: str = "message",
    data: dict[str, Any] | None = None,
) -> None:
    session.add(
        EventRow(
            id=event_id(),
            job_id=job.id,
            level=level,
            message=message,
            type=event_type,
            data=data if data is not None else {},
        )
    )


def _hyperparameters_view(job: JobRow) -> dict[str, Any]:
    resolved = job.resolved_hyperparameters
    if resolved:
        return {
            key: resolved[key] for key in ("n_epochs", "batch_size", "learning_rate_multiplier")
        }
    return dict(job.method["supervised"]["hyperparameters"])


def job_object(job: JobRow) -> FineTuningJobObject:
    hyperparameters = _hyperparameters_view(job)
    return FineTuningJobObject.model_validate(
        {
            "id": job.id,
            "object": "fine_tuning.job",
            "created_at": job.created_at,
            "error": job.error,
            "fine_tuned_model": job.fine_tuned_model,
            "finished_at": job.finished_at,
            "hyperparameters": hyperparameters,
            "model": job.model,
            "organization_id": job.organization,
            "result_files": job.result_files or [],
            "seed": job.seed,
            "status": job.status,
            "trained_tokens": job.trained_tokens,
            "training_file": job.training_file,
            "validation_file": job.validation_file,
            "estimated_finish": job.estimated_finish,
            "integrations": job.integrations,
            "metadata": job.job_metadata,
            "method": {"type": "supervised", "supervised": {"hyperparameters": hyperparameters}},
            "user_provided_suffix": job.suffix,
        }
    )


def event_object(row: EventRow) -> FineTuningJobEvent:
    return FineTuningJobEvent(
        id=row.id,
        object="fine_tuning.job.event",
        created_at=row.created_at,
        level=row.level,  # type: ignore[arg-type]
        message=row.message,
        type=row.type,  # type: ignore[arg-type]
        data=row.data,
    )


class FineTuningService:
    def __init__(
        self,
        db: Database,
        base_models: dict[str, BaseModelConfig],
        stop_training: StopTraining,
    ):
        self.db = db
        self.base_models = base_models
        self.stop_training = stop_training

    def _check_file(self, session: Session, tenant: Tenant, file_id: str, param: str) -> None:
        row = session.get(FileRow, file_id)
        if row is None or row.organization != tenant.organization:
            raise InvalidRequest(f"invalid {param}: {file_id}", param=param, code="invalid_file")
        if row.purpose != "fine-tune":
            raise InvalidRequest(
                f"File {file_id} has purpose '{row.purpose}', not 'fine-tune'", param=param
            )

    def create(self, tenant: Tenant, request: CreateFineTuningJobRequest) -> FineTuningJobObject:
        if request.method and request.method.type != "supervised":
            raise InvalidRequest(
                f"method.type '{request.method.type}' is not supported yet; use 'supervised'",
                param="method.type",
                code="unsupported_method",
            )
        if request.model not in self.base_models:
            raise InvalidRequest(
                f"Model {request.model} is not available for fine-tuning. "
                f"Available: {', '.join(sorted(self.base_models))}",
                param="model",
                code="model_not_available",
            )
        hyperparameters = request.supervised_hyperparameters()
        with self.db.session() as session:
            self._check_file(session, tenant, request.training_file, "training_file")
            if request.validation_file:
                self._check_file(session, tenant, request.validation_file, "validation_file")
            job = JobRow(
                id=job_id(),
                created_at=now(),
                organization=tenant.organization,
                model=request.model,
                training_file=request.training_file,
                validation_file=request.validation_file,
                suffix=request.suffix,
                seed=request.seed if request.seed is not None else secrets.randbelow(2**31),
                method={
                    "type": "supervised",
                    "supervised": {"hyperparameters": hyperparameters.model_dump()},
                },
                job_metadata=request.metadata,
                integrations=request.integrations,
                status=JobStatus.VALIDATING_FILES.value,
                model_short_id=model_short_id(),
                result_files=[],
            )
            session.add(job)
            add_event(session, job, f"Created fine-tuning job: {job.id}")
            files = f"Validating training file: {job.training_file}"
            if job.validation_file:
                files += f" and validation file: {job.validation_file}"
            add_event(session, job, files)
            return job_object(job)

    def _get(self, session: Session, tenant: Tenant, id_: str) -> JobRow:
        job = session.get(JobRow, id_)
        if job is None or job.organization != tenant.organization:
            raise NotFound(f"No such fine-tuning job: {id_}", param="fine_tuning_job_id")
        return job

    def retrieve(self, tenant: Tenant, id_: str) -> FineTuningJobObject:
        with self.db.session() as session:
            return job_object(self._get(session, tenant, id_))

    def list(
        self, tenant: Tenant, after: str | None, limit: int, metadata: dict[str, str]
    ) -> tuple[list[FineTuningJobObject], bool]:
        with self.db.session() as session:
            query = select(JobRow).where(JobRow.organization == tenant.organization)
            if after:
                anchor = self._get(session, tenant, after)
                query = query.where(
                    (JobRow.created_at < anchor.created_at)
                    | ((JobRow.created_at == anchor.created_at) & (JobRow.id < anchor.id))
                )
            query = query.order_by(JobRow.created_at.desc(), JobRow.id.desc())
            jobs: list[JobRow] = []
            # Metadata is JSON: filter in Python so SQLite and PostgreSQL agree.
            for job in session.scalars(query):
                if all((job.job_metadata or {}).get(k) == v for k, v in metadata.items()):
                    jobs.append(job)
                    if len(jobs) > limit:
                        break
            return [job_object(j) for j in jobs[:limit]], len(jobs) > limit

    def cancel(self, tenant: Tenant, id_: str) -> FineTuningJobObject:
        return self._stop(tenant, id_, JobStatus.CANCELLED, "Fine-tuning job cancelled")

    def pause(self, tenant: Tenant, id_: str) -> FineTuningJobObject:
        return self._stop(tenant, id_, JobStatus.PAUSED, "Fine-tuning job paused")

    def _stop(
        self, tenant: Tenant, id_: str, status: JobStatus, message: str
    ) -> FineTuningJobObject:
        with self.db.session() as session:
            job = self._get(session, tenant, id_)
            transition(job, status)
            add_event(session, job, message)
            if job.ray_submission_id:
                self.stop_training(job)
            return job_object(job)

    def resume(self, tenant: Tenant, id_: str) -> FineTuningJobObject:
        with self.db.session() as session:
            job = self._get(session, tenant, id_)
            transition(job, JobStatus.QUEUED)
            job.ray_submission_id = None
            add_event(session, job, "Fine-tuning job resumed, moving job to queued state")
            return job_object(job)

    def events(
        self, tenant: Tenant, id_: str, after: str | None, limit: int
    ) -> tuple[builtins.list[FineTuningJobEvent], bool]:
        with self.db.session() as session:
            self._get(session, tenant, id_)
            query = select(EventRow).where(EventRow.job_id == id_)
            if after:
                anchor = session.scalar(select(EventRow).where(EventRow.id == after))
                if anchor is None or anchor.job_id != id_:
                    raise NotFound(f"No such event: {after}", param="after")
                query = query.where(EventRow.seq < anchor.seq)
            rows = list(session.scalars(query.order_by(EventRow.seq.desc()).limit(limit + 1)))
            return [event_object(r) for r in rows[:limit]], len(rows) > limit
