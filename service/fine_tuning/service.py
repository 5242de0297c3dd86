"""Fine-tuning jobs: accept, list, control, and report them, per organization."""

from __future__ import annotations

import builtins
import logging
import secrets
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from openai.types.fine_tuning import FineTuningJobEvent
from openai.types.fine_tuning.jobs import FineTuningJobCheckpoint
from sqlalchemy import literal, select, tuple_
from sqlalchemy.orm import Session
from sqlalchemy.orm.exc import StaleDataError

from service.auth import Tenant
from service.config import BaseModelConfig
from service.db import CheckpointRow, Database, EventRow, FileRow, JobRow, now
from service.errors import Conflict, InvalidRequest, NotFound
from service.fine_tuning.attempts import method_of
from service.fine_tuning.events import add_event
from service.fine_tuning.lifecycle import (
    ON_CANCEL,
    ON_PAUSE,
    ON_RESUME,
    JobStatus,
    requested,
    transition,
    wire_status,
)
from service.fine_tuning.schemas import CreateFineTuningJobRequest, FineTuningJobObject
from service.ids import job_id, model_short_id
from service.models.adapters import check_job
from service.models.service import tuned_adapter

if TYPE_CHECKING:
    from service.organization.limits import Limits

logger = logging.getLogger(__name__)

# Stops a Ray submission at once, best effort; given by the app (the scheduler owns Ray
# and makes sure of it on its next tick).
StopTraining = Callable[[str], None]
# A reinforcement job's grader as the request gave it → as the job keeps it (validated),
# and its model graders' judges resolved for the caller (training.spec.JudgeTarget).
CheckGrader = Callable[[dict[str, Any]], tuple[dict[str, Any], dict[str, Any]]]
# What a job keeps in its method settings for the trainer alone, never shown.
TRAINER_ONLY_SETTINGS = frozenset({"judges"})
# A user's request racing the scheduler's write of the same job is tried again on what
# the scheduler wrote; this many times before the API gives up with a 409.
CONTROL_TRIES = 5


OPENAI_HYPERPARAMETERS = ("n_epochs", "batch_size", "learning_rate_multiplier")


def _method_hyperparameters(job: JobRow) -> dict[str, Any]:
    """What `method.<type>.hyperparameters` shows: OpenAI's and ftaas's, as resolved once
    the job has started (as requested before)."""
    requested = dict(job.method[method_of(job)]["hyperparameters"])
    resolved = job.resolved_hyperparameters or {}
    return {key: resolved.get(key, value) for key, value in requested.items()}


def job_object(job: JobRow) -> FineTuningJobObject:
    method_hyperparameters = _method_hyperparameters(job)
    hyperparameters = {key: method_hyperparameters[key] for key in OPENAI_HYPERPARAMETERS}
    return FineTuningJobObject.model_validate(
        {
            "id": job.id,
            "object": "fine_tuning.job",
            "created_at": job.created_at,
            "error": job.error,
            "fine_tuned_model": job.fine_tuned_model,
            "finished_at": job.finished_at,
            "hyperparameters": hyperparameters,
            "model": job.parent_model or job.model,
            "organization_id": job.organization,
            "result_files": job.result_files or [],
            "seed": job.seed,
            "status": wire_status(job.status),
            # As OpenAI's: the tokens trained, once the job has succeeded (null before).
            "trained_tokens": job.trained_tokens if job.status == JobStatus.SUCCEEDED else None,
            "training_file": job.training_file,
            "validation_file": job.validation_file,
            "estimated_finish": job.estimated_finish,
            "integrations": job.integrations,
            "metadata": job.job_metadata,
            "method": {
                "type": method_of(job),
                method_of(job): {
                    **{  # a reinforcement job's grader and response_format
                        key: value
                        for key, value in job.method[method_of(job)].items()
                        if key not in TRAINER_ONLY_SETTINGS
                    },
                    "hyperparameters": method_hyperparameters,
                },
            },
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


def checkpoint_object(row: CheckpointRow) -> FineTuningJobCheckpoint:
    return FineTuningJobCheckpoint(
        id=row.id,
        object="fine_tuning.job.checkpoint",
        created_at=row.created_at,
        fine_tuned_model_checkpoint=row.model_name,
        fine_tuning_job_id=row.job_id,
        step_number=row.step_number,
        metrics=row.metrics,  # type: ignore[arg-type]
    )


class FineTuningService:
    def __init__(
        self,
        db: Database,
        base_models: dict[str, BaseModelConfig],
        stop_training: StopTraining,
        limits: Limits | None = None,
        on_new_work: Callable[[], None] = lambda: None,
    ):
        """`on_new_work`: called once a job is created or resumed (the scheduler wakes)."""
        self.db = db
        self.on_new_work = on_new_work
        self.base_models = base_models
        self.stop_training = stop_training
        self.limits = limits  # quotas per organization; None: unlimited

    def _check_file(self, session: Session, tenant: Tenant, file_id: str, param: str) -> None:
        row = session.get(FileRow, file_id)
        if row is None or row.organization != tenant.organization:
            raise InvalidRequest(f"invalid {param}: {file_id}", param=param, code="invalid_file")
        if row.purpose != "fine-tune":
            raise InvalidRequest(
                f"File {file_id} has purpose '{row.purpose}', not 'fine-tune'", param=param
            )

    def _starting_point(
        self, session: Session, tenant: Tenant, model: str
    ) -> tuple[str, str | None]:
        """The base model a job trains, and the adapter it starts from: none for a base
        model; a tuned model's (or checkpoint's) own for an `ft:` name of this tenant."""
        if model in self.base_models:
            return model, None
        adapter = tuned_adapter(session, tenant, model)
        if adapter is None or adapter[0] not in self.base_models:
            raise InvalidRequest(
                f"Model {model} is not available for fine-tuning. Use a base model "
                f"({', '.join(sorted(self.base_models))}) or one of your fine-tuned models",
                param="model",
                code="model_not_available",
            )
        return adapter

    def create(
        self,
        tenant: Tenant,
        request: CreateFineTuningJobRequest,
        check_grader: CheckGrader | None = None,
    ) -> FineTuningJobObject:
        """`check_grader`: a reinforcement job's grader, checked (a 400 naming the field
        unless this server can run it)."""
        method = request.method_type
        settings: dict[str, Any] = {}
        if request.method is not None and request.method.reinforcement is not None:
            if check_grader is None:
                raise InvalidRequest(
                    "reinforcement jobs are not available on this server",
                    param="method.type",
                    code="unsupported_method",
                )
            reinforcement = request.method.reinforcement
            settings["grader"], judges = check_grader(reinforcement.grader)
            if judges:
                settings["judges"] = {
                    model: target.model_dump(exclude_none=True) for model, target in judges.items()
                }
            if reinforcement.response_format is not None:
                settings["response_format"] = reinforcement.response_format.as_dict()
        if request.hyperparameters is not None and method != "supervised":
            raise InvalidRequest(
                "The deprecated top-level `hyperparameters` apply to supervised jobs only: "
                f"use method.{method}.hyperparameters",
                param="hyperparameters",
            )
        hyperparameters = request.method_hyperparameters()
        if (
            getattr(hyperparameters, "early_stopping_patience", None)
            and not request.validation_file
        ):
            raise InvalidRequest(
                "early_stopping_patience needs a validation_file: early stopping watches "
                "the full validation loss at each epoch's end",
                param=f"{request.hyperparameters_param}.early_stopping_patience",
            )
        with self.db.session() as session:
            if self.limits is not None:
                self.limits.check_jobs(session, tenant.organization)
            base_model, start_adapter = self._starting_point(session, tenant, request.model)
            check_job(self.base_models[base_model], hyperparameters, request.hyperparameters_param)
            self._check_file(session, tenant, request.training_file, "training_file")
            if request.validation_file:
                self._check_file(session, tenant, request.validation_file, "validation_file")
            job = JobRow(
                id=job_id(),
                created_at=now(),
                organization=tenant.organization,
                model=base_model,
                parent_model=request.model if start_adapter else None,
                start_adapter=start_adapter,
                training_file=request.training_file,
                validation_file=request.validation_file,
                suffix=request.suffix,
                seed=request.seed if request.seed is not None else secrets.randbelow(2**31),
                method={
                    "type": method,
                    method: {**settings, "hyperparameters": hyperparameters.model_dump()},
                },
                job_metadata=request.metadata,
                integrations=[i.model_dump(exclude_none=True) for i in request.integrations]
                if request.integrations is not None
                else None,
                status=JobStatus.VALIDATING_FILES.value,
                model_short_id=model_short_id(),
                result_files=[],
            )
            session.add(job)
            session.flush()  # the job row first: its events refer to it (PostgreSQL checks)
            add_event(session, job, f"Created fine-tuning job: {job.id}")
            files = f"Validating training file: {job.training_file}"
            if job.validation_file:
                files += f" and validation file: {job.validation_file}"
            add_event(session, job, files)
            created = job_object(job)
        self.on_new_work()
        return created

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
                # (arrival, id): rows of the same nanosecond keep one order; none skipped.
                query = query.where(
                    tuple_(JobRow.arrival, JobRow.id)
                    < tuple_(literal(anchor.arrival), literal(anchor.id))
                )
            query = query.order_by(JobRow.arrival.desc(), JobRow.id.desc())
            if not metadata:
                rows = list(session.scalars(query.limit(limit + 1)))
                return [job_object(j) for j in rows[:limit]], len(rows) > limit
            jobs: builtins.list[JobRow] = []
            # Metadata is JSON: filter in Python so SQLite and PostgreSQL agree, reading
            # the organization's jobs in pages rather than all at once.
            for job in session.scalars(query.execution_options(yield_per=500)):
                if all((job.job_metadata or {}).get(k) == v for k, v in metadata.items()):
                    jobs.append(job)
                    if len(jobs) > limit:
                        break
            return [job_object(j) for j in jobs[:limit]], len(jobs) > limit

    def _compare_and_set(
        self, tenant: Tenant, id_: str, change: Callable[[Session, JobRow], None]
    ) -> JobRow:
        """Apply a user's change to the job as it is now. The write is a compare-and-set
        (the job's version): if the scheduler moved the job since it was read, the try is
        rolled back and the change is decided again on what the scheduler wrote."""
        for _ in range(CONTROL_TRIES):
            try:
                with self.db.session() as session:
                    job = self._get(session, tenant, id_)
                    change(session, job)
                    session.flush()
                return job
            except StaleDataError:
                continue
        raise Conflict(
            f"Job {id_} is changing state right now; try again.",
            param="fine_tuning_job_id",
            code="job_busy",
        )

    def cancel(self, tenant: Tenant, id_: str) -> FineTuningJobObject:
        """Cancelled at once for the user; a live trainer is stopped now (best effort) and
        by the scheduler until it has ended."""

        def change(session: Session, job: JobRow) -> None:
            transition(job, requested(job, ON_CANCEL, "cancelled"))
            add_event(session, job, "Fine-tuning job cancelled")

        job = self._compare_and_set(tenant, id_, change)
        if job.status == JobStatus.CANCELLING and job.ray_submission_id:
            self.stop_training(job.ray_submission_id)
        return job_object(job)

    def pause(self, tenant: Tenant, id_: str) -> FineTuningJobObject:
        """Asks the trainer to checkpoint at its next step and stop; resume continues there."""

        def change(session: Session, job: JobRow) -> None:
            transition(job, requested(job, ON_PAUSE, "paused"))
            job.pause_requested_at = None  # set by the scheduler once it asks the trainer
            add_event(session, job, "Fine-tuning job paused")

        return job_object(self._compare_and_set(tenant, id_, change))

    def resume(self, tenant: Tenant, id_: str) -> FineTuningJobObject:
        """Queued again; a trainer still saving its pause checkpoint is waited for."""

        def change(session: Session, job: JobRow) -> None:
            if job.status == JobStatus.PAUSED and self.limits is not None:
                # A paused job is not counted: resuming it is one more unfinished job.
                self.limits.check_jobs(session, tenant.organization)
            transition(job, requested(job, ON_RESUME, "resumed"))
            add_event(session, job, "Fine-tuning job resumed, moving job to queued state")

        resumed = job_object(self._compare_and_set(tenant, id_, change))
        self.on_new_work()
        return resumed

    def events(
        self, tenant: Tenant, id_: str, after: str | None, limit: int
    ) -> tuple[builtins.list[FineTuningJobEvent], bool]:
        rows, has_more = self._newest_first(tenant, id_, EventRow, EventRow.seq, after, limit)
        return [event_object(r) for r in rows], has_more

    def checkpoints(
        self, tenant: Tenant, id_: str, after: str | None, limit: int
    ) -> tuple[builtins.list[FineTuningJobCheckpoint], bool]:
        rows, has_more = self._newest_first(
            tenant, id_, CheckpointRow, CheckpointRow.step_number, after, limit
        )
        return [checkpoint_object(r) for r in rows], has_more

    def _newest_first(
        self,
        tenant: Tenant,
        id_: str,
        table: type[EventRow] | type[CheckpointRow],
        key: Any,
        after: str | None,
        limit: int,
    ) -> tuple[builtins.list[Any], bool]:
        """A page of a job's events or checkpoints, newest first, after the row `after`."""
        with self.db.session() as session:
            self._get(session, tenant, id_)
            query = select(table).where(table.job_id == id_)
            if after:
                anchor: Any = session.scalar(select(table).where(table.id == after))
                if anchor is None or anchor.job_id != id_:
                    raise NotFound(f"No such item of job {id_}: {after}", param="after")
                query = query.where(key < getattr(anchor, key.key))
            rows = list(session.scalars(query.order_by(key.desc()).limit(limit + 1)))
            return rows[:limit], len(rows) > limit
