"""A job's events: what its owner reads in `GET /v1/fine_tuning/jobs/{id}/events`.

Written by the API (a job created, paused, resumed) and by the scheduler (what the trainer
reported), in the same transaction as the change they describe.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy.orm import Session

from service.db import EventRow, JobRow
from service.ids import event_id


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


def metrics_message(data: dict[str, Any]) -> str:
    """A metrics event's message, as OpenAI words it."""
    message = f"Step {data['step']}/{data['total_steps']}"
    if "train_loss" in data:
        message += f": training loss={data['train_loss']:.4f}"
    if "valid_loss" in data:
        message += f", validation loss={data['valid_loss']:.4f}"
    if "full_valid_loss" in data:
        message += f", full validation loss={data['full_valid_loss']:.4f}"
    # Reinforcement jobs, as OpenAI words them (the validation is over the whole set).
    if "train_reward_mean" in data:
        message += f", train mean reward={data['train_reward_mean']:.2f}"
    if "valid_reward_mean" in data:
        message += f", full validation mean reward={data['valid_reward_mean']:.2f}"
    return message
