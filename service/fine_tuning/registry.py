"""The model registry: what a job makes callable by name.

A job's checkpoints are models while it trains (`ft:…:ckpt-step-N`, the newest
KEEP_CHECKPOINTS of them), and its tuned model once it succeeds, with its result file.
The reconciler decides when; this says what that means in the job store. Serving is told
afterwards, by what these return: a new model to load, pruned checkpoints to drop before
their files go ("serving first, files last").
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.orm import Session

from service.db import CheckpointRow, JobRow, ModelRow, now
from service.fine_tuning.events import add_event
from service.fine_tuning.naming import checkpoint_model_name, fine_tuned_model_name
from service.fine_tuning.results import write_result_file
from service.ids import checkpoint_id
from training.progress import Checkpoint
from training.spec import KEEP_CHECKPOINTS
from training.storage import ArtifactStore


@dataclass(frozen=True)
class ReadyModel:
    """A model that just became available: serving is told to load it."""

    name: str
    base_model: str
    adapter_dir: str


@dataclass(frozen=True)
class PrunedCheckpoint:
    """A checkpoint past the newest KEEP_CHECKPOINTS, unlisted: serving drops it, then its
    files go (`AttemptStore.delete_checkpoint`)."""

    name: str
    base_model: str
    path: str


def model_name(job: JobRow) -> str:
    """The name the job's tuned model has (or will have)."""
    return fine_tuned_model_name(job.model, job.organization, job.suffix, job.model_short_id)


class ModelRegistry:
    def __init__(self, store: ArtifactStore):
        self.store = store  # where the result file goes

    def add_checkpoint(
        self, session: Session, job: JobRow, record: Checkpoint
    ) -> list[PrunedCheckpoint]:
        """The checkpoint becomes a model; the job's oldest past KEEP_CHECKPOINTS, across
        attempts (a resumed job keeps three too), are unlisted and returned."""
        job.resume_from = record.path
        session.add(
            CheckpointRow(
                id=checkpoint_id(),
                job_id=job.id,
                organization=job.organization,
                created_at=record.time,
                step_number=record.step,
                model_name=checkpoint_model_name(model_name(job), record.step),
                path=record.path,
                metrics=dict(record.metrics) or {"step": record.step},
            )
        )
        session.flush()
        rows = session.scalars(
            select(CheckpointRow)
            .where(CheckpointRow.job_id == job.id)
            .order_by(CheckpointRow.step_number.desc())
        ).all()
        pruned = []
        kept = _kept_checkpoints(rows)
        for old in rows:
            if old.id not in kept:
                session.delete(old)
                pruned.append(PrunedCheckpoint(old.model_name, job.model, old.path))
        return pruned

    def register_tuned_model(self, session: Session, job: JobRow, adapter_dir: str) -> ReadyModel:
        """The job's tuned model and its result file (the caller marks it succeeded)."""
        name = model_name(job)
        session.add(
            ModelRow(
                id=name,
                organization=job.organization,
                base_model=job.model,
                job_id=job.id,
                adapter_dir=adapter_dir,
                created_at=now(),
            )
        )
        job.fine_tuned_model = name
        # A small PUT inside the transaction, by choice: the CSV is made from the events
        # this transaction just added, and a file written after the commit could be lost
        # to a crash with the job already succeeded (review L3 keeps Ray's calls out).
        job.result_files = [write_result_file(session, self.store, job)]
        add_event(session, job, f"New fine-tuned model created: {name}")
        return ReadyModel(name=name, base_model=job.model, adapter_dir=adapter_dir)


# What a reinforcement job's checkpoints are ranked by (OpenAI keeps the three best).
RANKING_METRIC = "valid_reward_mean"


def _kept_checkpoints(rows: Sequence[CheckpointRow]) -> set[str]:
    """The ids of the checkpoints a job keeps (`rows` newest first): the newest
    KEEP_CHECKPOINTS; or, for checkpoints ranked by a validation reward, the best
    KEEP_CHECKPOINTS and the newest (the one a resume continues from)."""
    ranked = [row for row in rows if RANKING_METRIC in (row.metrics or {})]
    if not ranked:
        return {row.id for row in rows[:KEEP_CHECKPOINTS]}
    best = sorted(ranked, key=lambda row: (-row.metrics[RANKING_METRIC], -row.step_number))
    return {row.id for row in [*best[:KEEP_CHECKPOINTS], *rows[:1]]}
