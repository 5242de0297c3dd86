"""The scheduler: moves jobs through their life cycle and reconciles them with Ray.

One `tick` looks at every non-terminal job once: validates files, submits queued jobs
within the running limit, turns the trainer's progress log into events, and finishes jobs
whose Ray job ended. Everything it learns is written to the job store first, so a
restarted service resumes from the store and the progress logs, never from memory.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from service.blobs import LocalBlobStore
from service.config import BaseModelConfig, Settings
from service.db import Database, FileRow, JobRow, ModelRow, now
from service.fine_tuning.lifecycle import TERMINAL, JobStatus, transition
from service.fine_tuning.naming import fine_tuned_model_name
from service.fine_tuning.ray_jobs import RAY_ACTIVE, RAY_SUCCEEDED, RayJobs
from service.fine_tuning.service import add_event
from training.data.validation import MIN_EXAMPLES
from training.hyperparameters import SupervisedHyperparameters, resolve
from training.progress import ProgressLog
from training.spec import TrainingSpec, progress_path

logger = logging.getLogger(__name__)

SUPERVISED_FORMATS = {"chat", "prompt_completion"}


@dataclass(frozen=True)
class ReadyModel:
    """A model that just became available: serving is told to load it."""

    name: str
    base_model: str
    adapter_dir: str


def _fail(session: Session, job: JobRow, code: str, message: str, param: str | None) -> None:
    transition(job, JobStatus.FAILED)
    job.error = {"code": code, "message": message, "param": param}
    add_event(session, job, message, level="error")


class Scheduler:
    def __init__(
        self,
        db: Database,
        settings: Settings,
        base_models: dict[str, BaseModelConfig],
        blobs: LocalBlobStore,
        ray_jobs: RayJobs,
        use_gpu: bool = False,
    ):
        self.db = db
        self.settings = settings
        self.base_models = base_models
        self.blobs = blobs
        self.ray_jobs = ray_jobs
        self.use_gpu = use_gpu

    def tick(self) -> list[ReadyModel]:
        """Step every open job once, each in its own transaction: a failure (say, Ray
        refusing a submission) leaves that job as it was for the next tick, and others
        still move."""
        ready: list[ReadyModel] = []
        with self.db.session() as session:
            open_ids = session.scalars(
                select(JobRow.id)
                .where(JobRow.status.not_in([s.value for s in TERMINAL]))
                .order_by(JobRow.created_at, JobRow.id)
            ).all()
        for job_id in open_ids:
            try:
                model = self._step(job_id)
            except Exception:  # retried on the next tick
                logger.exception("could not step job %s", job_id)
                continue
            if model:
                ready.append(model)
        return ready

    def _step(self, job_id: str) -> ReadyModel | None:
        with self.db.session() as session:
            job = session.get(JobRow, job_id)
            if job is None:
                return None
            if job.status == JobStatus.VALIDATING_FILES:
                self._validate_files(session, job)
            if job.status == JobStatus.QUEUED:
                self._maybe_submit(session, job)
            if job.status == JobStatus.RUNNING:
                return self._reconcile_running(session, job)
            return None

    # --- validating_files → queued | failed
    def _validate_files(self, session: Session, job: JobRow) -> None:
        for param in ("training_file", "validation_file"):
            file_id = getattr(job, param)
            if file_id is None:
                continue
            row = session.get(FileRow, file_id)
            if row is None:
                return _fail(session, job, "invalid_file", f"File {file_id} was deleted", param)
            if row.status == "error":
                message = f"Invalid {param} {file_id}: {row.status_details}"
                return _fail(session, job, f"invalid_{param}", message, param)
            if row.data_format not in SUPERVISED_FORMATS:
                message = (
                    f"{param} {file_id} holds {row.data_format} examples; supervised "
                    "fine-tuning needs chat (`messages`) or prompt/completion examples"
                )
                return _fail(session, job, f"invalid_{param}", message, param)
            if param == "training_file" and (row.n_examples or 0) < MIN_EXAMPLES:
                message = (
                    f"Training file has {row.n_examples} example(s), "
                    f"but must have at least {MIN_EXAMPLES} examples"
                )
                return _fail(session, job, "invalid_n_examples", message, param)
        transition(job, JobStatus.QUEUED)
        add_event(session, job, "Files validated, moving job to queued state")

    # --- queued → running
    def _maybe_submit(self, session: Session, job: JobRow) -> None:
        running = session.scalar(
            select(func.count()).select_from(JobRow).where(JobRow.status == JobStatus.RUNNING)
        )
        if (running or 0) >= self.settings.max_running_jobs:
            return
        base = self.base_models[job.model]
        training_file = session.get(FileRow, job.training_file)
        assert training_file is not None
        requested = SupervisedHyperparameters.model_validate(
            job.method["supervised"]["hyperparameters"]
        )
        hyperparameters = resolve(requested, training_file.n_examples or 0, base.learning_rate)
        job.attempts += 1
        # Ray keeps every submission id forever: a resumed or re-run job needs a new one,
        # and its own folder so an earlier attempt's progress log is never re-read.
        submission_id = job.id if job.attempts == 1 else f"{job.id}-{job.attempts}"
        output_dir = self.settings.home / "jobs" / job.id / f"attempt-{job.attempts}"
        output_dir.mkdir(parents=True, exist_ok=True)
        spec = TrainingSpec(
            job_id=submission_id,
            base_model=base.id,
            base_model_path=base.path,
            max_length=base.max_length,
            training_file=str(self.blobs.local_path(training_file.blob_key)),
            validation_file=None,
            data_format=training_file.data_format or "chat",  # type: ignore[arg-type]
            output_dir=str(output_dir),
            hyperparameters=hyperparameters,
            seed=job.seed,
            num_workers=self.settings.training_num_workers,
            use_gpu=self.use_gpu,
        )
        spec.save(output_dir / "spec.json")
        self.ray_jobs.submit(submission_id, str(output_dir / "spec.json"), env={})
        job.output_dir = str(output_dir)
        job.ray_submission_id = submission_id
        job.progress_offset = 0
        job.resolved_hyperparameters = hyperparameters.model_dump()
        transition(job, JobStatus.RUNNING)
        add_event(session, job, "Fine-tuning job started")

    # --- running → succeeded | failed | queued
    def _reconcile_running(self, session: Session, job: JobRow) -> ReadyModel | None:
        assert job.output_dir and job.ray_submission_id
        progress = ProgressLog(progress_path(job.output_dir))
        records, job.progress_offset = progress.read_from(job.progress_offset)
        outcome: dict[str, Any] | None = None
        for record in records:
            outcome = self._apply_record(session, job, record) or outcome
        if outcome is not None:
            return self._finish(session, job, outcome)

        info = self.ray_jobs.info(job.ray_submission_id)
        if info is None:
            transition(job, JobStatus.QUEUED)
            job.ray_submission_id = None
            add_event(session, job, "Ray no longer knows this job; it is queued to run again")
            return None
        ray_status = str(getattr(info.status, "value", info.status))
        if ray_status in RAY_ACTIVE or ray_status == RAY_SUCCEEDED:
            return None  # a succeeded job's last record may not be read yet
        tail = self.ray_jobs.logs_tail(job.ray_submission_id)
        logger.warning("training job %s ended %s without an outcome:\n%s", job.id, ray_status, tail)
        _fail(
            session,
            job,
            "training_error",
            f"The training process ended unexpectedly ({ray_status}): {info.message or ''}".strip(),
            None,
        )
        return None

    def _apply_record(
        self, session: Session, job: JobRow, record: dict[str, Any]
    ) -> dict[str, Any] | None:
        kind = record["type"]
        if kind == "started":
            job.trained_tokens = record.get("trained_tokens")
            if record.get("n_truncated"):
                add_event(
                    session,
                    job,
                    f"{record['n_truncated']} example(s) were longer than the model's "
                    "context and were truncated from the end",
                    level="warn",
                )
        elif kind == "metrics":
            data = {k: v for k, v in record.items() if k not in ("type", "time")}
            message = (
                f"Step {data['step']}/{data['total_steps']}: training loss={data['train_loss']:.4f}"
            )
            add_event(session, job, message, event_type="metrics", data=data)
            step, total, elapsed = data["step"], data["total_steps"], data.get("elapsed_s", 0)
            if 0 < step < total:
                job.estimated_finish = record["time"] + int(elapsed / step * (total - step))
        elif kind in ("succeeded", "failed"):
            return record
        return None

    def _finish(self, session: Session, job: JobRow, outcome: dict[str, Any]) -> ReadyModel | None:
        if outcome["type"] == "failed":
            _fail(session, job, outcome.get("code", "training_error"), outcome["message"], None)
            return None
        name = fine_tuned_model_name(job.model, job.organization, job.suffix, job.model_short_id)
        session.add(
            ModelRow(
                id=name,
                organization=job.organization,
                base_model=job.model,
                job_id=job.id,
                adapter_dir=outcome["adapter_dir"],
                created_at=now(),
            )
        )
        job.fine_tuned_model = name
        add_event(session, job, f"New fine-tuned model created: {name}")
        transition(job, JobStatus.SUCCEEDED)
        add_event(session, job, "The job has successfully completed")
        return ReadyModel(name=name, base_model=job.model, adapter_dir=outcome["adapter_dir"])

    def stop(self, job: JobRow) -> None:
        if job.ray_submission_id:
            self.ray_jobs.stop(job.ray_submission_id)
