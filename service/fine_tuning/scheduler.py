"""The scheduler: moves jobs through their life cycle and reconciles them with Ray.

One `tick` looks at every non-terminal job once: validates files, submits queued jobs
within the running limit, turns the trainer's progress log into events, and finishes jobs
whose Ray job ended. Everything it learns is written to the job store first, so a
restarted service resumes from the store and the progress logs, never from memory.
"""

from __future__ import annotations

import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from service.blobs import LocalBlobStore
from service.config import BaseModelConfig, Settings
from service.db import CheckpointRow, Database, FileRow, JobRow, ModelRow, now
from service.fine_tuning.lifecycle import TERMINAL, JobStatus, transition
from service.fine_tuning.naming import checkpoint_model_name, fine_tuned_model_name
from service.fine_tuning.ray_jobs import RAY_ACTIVE, RayJobs
from service.fine_tuning.results import write_result_file
from service.fine_tuning.service import add_event
from service.ids import checkpoint_id
from training.data.validation import MIN_EXAMPLES
from training.hyperparameters import SupervisedHyperparameters, resolve
from training.progress import ProgressLog
from training.spec import TrainingSpec, progress_path

logger = logging.getLogger(__name__)

SUPERVISED_FORMATS = {"chat", "prompt_completion"}
KEEP_CHECKPOINTS = 3
# A paused job's trainer saves and stops at its next step; one that has not after this
# long (stuck loading a model, say) is stopped, and resumes from its last epoch.
PAUSE_GRACE_S = 60
# A job paused (or already resumed) whose trainer is still saving its checkpoint.
WINDING_DOWN = (JobStatus.PAUSED, JobStatus.QUEUED)


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
                .order_by(JobRow.arrival)
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
            if job.status in WINDING_DOWN and job.ray_submission_id:
                ready = self._wind_down(session, job)
                if ready or job.ray_submission_id:
                    return ready
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
        # A paused job holds its resources until its trainer has saved and stopped.
        running = session.scalar(
            select(func.count())
            .select_from(JobRow)
            .where(JobRow.status.in_([JobStatus.RUNNING, *WINDING_DOWN]))
            .where(JobRow.ray_submission_id.is_not(None))
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
            validation_file=self._local_file(session, job.validation_file),
            data_format=training_file.data_format or "chat",  # type: ignore[arg-type]
            output_dir=str(output_dir),
            hyperparameters=hyperparameters,
            seed=job.seed,
            num_workers=self.settings.training_num_workers,
            use_gpu=self.use_gpu,
            resume_from=job.resume_from,
            wandb=_wandb_settings(job.integrations),
        )
        spec.save(output_dir / "spec.json")
        self.ray_jobs.submit(submission_id, str(output_dir / "spec.json"), env=_trainer_env())
        job.output_dir = str(output_dir)
        job.ray_submission_id = submission_id
        job.progress_offset = 0
        job.resolved_hyperparameters = hyperparameters.model_dump()
        job.pause_requested_at = None
        transition(job, JobStatus.RUNNING)
        if job.resume_from:
            add_event(session, job, f"Fine-tuning job resumed from {Path(job.resume_from).name}")
        else:
            add_event(session, job, "Fine-tuning job started")

    # --- running → succeeded | failed | queued
    def _reconcile_running(self, session: Session, job: JobRow) -> ReadyModel | None:
        assert job.ray_submission_id
        # Ray first, then the log: once Ray reports the job ended, the log read after it
        # holds every record the trainer will ever write.
        info = self.ray_jobs.info(job.ray_submission_id)
        outcome = self._read_progress(session, job)
        if outcome is not None:
            return self._finish(session, job, outcome)
        if info is None:
            transition(job, JobStatus.QUEUED)
            job.ray_submission_id = None
            add_event(session, job, "Ray no longer knows this job; it is queued to run again")
            return None
        ray_status = str(getattr(info.status, "value", info.status))
        if ray_status in RAY_ACTIVE:
            return None
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

    def _read_progress(self, session: Session, job: JobRow) -> dict[str, Any] | None:
        """Turn the trainer's new records into events and checkpoints; its outcome, if any."""
        assert job.output_dir
        progress = ProgressLog(progress_path(job.output_dir))
        records, job.progress_offset = progress.read_from(job.progress_offset)
        outcome: dict[str, Any] | None = None
        for record in records:
            outcome = self._apply_record(session, job, record) or outcome
        return outcome

    # --- paused or resumed while the trainer winds down: wait for its checkpoint
    def _wind_down(self, session: Session, job: JobRow) -> ReadyModel | None:
        assert job.ray_submission_id
        info = self.ray_jobs.info(job.ray_submission_id)  # before the log, as when running
        ray_status = str(getattr(info.status, "value", info.status)) if info else None
        outcome = self._read_progress(session, job)
        if outcome is not None:  # it finished before it saw the pause request
            return self._finish(session, job, outcome)
        if ray_status in RAY_ACTIVE:
            waited = now() - (job.pause_requested_at or now())
            if waited < PAUSE_GRACE_S:
                return None
            self.ray_jobs.stop(job.ray_submission_id)
            add_event(
                session,
                job,
                "The trainer did not pause in time and was stopped; the job will resume "
                "from its last checkpoint",
                level="warn",
            )
        job.ray_submission_id = None
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
            data = {k: v for k, v in record.items() if k not in METRICS_BOOKKEEPING}
            add_event(session, job, _metrics_message(data), event_type="metrics", data=data)
            step, total = data["step"], data["total_steps"]
            done, elapsed = record.get("steps_this_run", step), record.get("elapsed_s", 0)
            if done > 0 and step < total:
                job.estimated_finish = record["time"] + int(elapsed / done * (total - step))
        elif kind == "checkpoint":
            self._add_checkpoint(session, job, record)
        elif kind == "paused":
            job.resume_from = record["path"]
            add_event(session, job, f"Checkpoint saved at step {record['step']}; ready to resume")
        elif kind == "notice":
            add_event(session, job, record["message"])
        elif kind in ("succeeded", "failed"):
            return record
        return None

    def _add_checkpoint(self, session: Session, job: JobRow, record: dict[str, Any]) -> None:
        job.resume_from = record["path"]
        step = record["step"]
        session.add(
            CheckpointRow(
                id=checkpoint_id(),
                job_id=job.id,
                organization=job.organization,
                created_at=record["time"],
                step_number=step,
                model_name=checkpoint_model_name(self._model_name(job), step),
                path=record["path"],
                metrics=record.get("metrics", {"step": step}),
            )
        )
        session.flush()
        rows = session.scalars(
            select(CheckpointRow)
            .where(CheckpointRow.job_id == job.id)
            .order_by(CheckpointRow.step_number.desc())
        ).all()
        for old in rows[KEEP_CHECKPOINTS:]:  # across attempts: a resumed job keeps three too
            shutil.rmtree(old.path, ignore_errors=True)
            session.delete(old)

    @staticmethod
    def _model_name(job: JobRow) -> str:
        return fine_tuned_model_name(job.model, job.organization, job.suffix, job.model_short_id)

    def _local_file(self, session: Session, file_id: str | None) -> str | None:
        row = session.get(FileRow, file_id) if file_id else None
        return str(self.blobs.local_path(row.blob_key)) if row else None

    def _finish(self, session: Session, job: JobRow, outcome: dict[str, Any]) -> ReadyModel | None:
        if outcome["type"] == "failed":
            _fail(session, job, outcome.get("code", "training_error"), outcome["message"], None)
            return None
        name = self._model_name(job)
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
        job.result_files = [write_result_file(session, self.blobs, job)]
        add_event(session, job, f"New fine-tuned model created: {name}")
        transition(job, JobStatus.SUCCEEDED)
        add_event(session, job, "The job has successfully completed")
        return ReadyModel(name=name, base_model=job.model, adapter_dir=outcome["adapter_dir"])

    def stop(self, job: JobRow) -> None:
        if job.ray_submission_id:
            self.ray_jobs.stop(job.ray_submission_id)


# Trainer bookkeeping that stays out of the metrics event's `data`.
METRICS_BOOKKEEPING = frozenset({"type", "time", "elapsed_s", "steps_this_run", "epoch"})


def _metrics_message(data: dict[str, Any]) -> str:
    message = f"Step {data['step']}/{data['total_steps']}: training loss={data['train_loss']:.4f}"
    if "valid_loss" in data:
        message += f", validation loss={data['valid_loss']:.4f}"
    if "full_valid_loss" in data:
        message += f", full validation loss={data['full_valid_loss']:.4f}"
    return message


def _wandb_settings(integrations: list[Any] | None) -> dict[str, Any] | None:
    for integration in integrations or []:
        if isinstance(integration, dict) and integration.get("type") == "wandb":
            return dict(integration.get("wandb") or {})
    return None


def _trainer_env() -> dict[str, str]:
    """What the trainer may need from the service's environment (the W&B key)."""
    return {k: os.environ[k] for k in ("WANDB_API_KEY", "WANDB_BASE_URL") if k in os.environ}
