"""The job life cycle as an explicit state machine: the scheduler and the routes step it."""

from __future__ import annotations

from enum import StrEnum

from service.db import JobRow, now
from service.errors import Conflict


class JobStatus(StrEnum):
    VALIDATING_FILES = "validating_files"
    QUEUED = "queued"
    RUNNING = "running"
    PAUSED = "paused"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


TERMINAL = frozenset({JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED})

ALLOWED: dict[JobStatus, frozenset[JobStatus]] = {
    JobStatus.VALIDATING_FILES: frozenset(
        {JobStatus.QUEUED, JobStatus.FAILED, JobStatus.CANCELLED}
    ),
    # queued → succeeded: resumed while its paused trainer was finishing the last step.
    JobStatus.QUEUED: frozenset(
        {
            JobStatus.RUNNING,
            JobStatus.PAUSED,
            JobStatus.SUCCEEDED,
            JobStatus.FAILED,
            JobStatus.CANCELLED,
        }
    ),
    # running → queued: Ray lost the job (its cluster restarted) and it must run again.
    JobStatus.RUNNING: frozenset(
        {
            JobStatus.SUCCEEDED,
            JobStatus.FAILED,
            JobStatus.CANCELLED,
            JobStatus.PAUSED,
            JobStatus.QUEUED,
        }
    ),
    # paused → succeeded | failed: the trainer ended before it saw the pause request.
    JobStatus.PAUSED: frozenset(
        {JobStatus.QUEUED, JobStatus.CANCELLED, JobStatus.SUCCEEDED, JobStatus.FAILED}
    ),
    JobStatus.SUCCEEDED: frozenset(),
    JobStatus.FAILED: frozenset(),
    JobStatus.CANCELLED: frozenset(),
}


class InvalidTransition(Conflict):
    pass


def can_transition(current: str, new: JobStatus) -> bool:
    return new in ALLOWED[JobStatus(current)]


def transition(job: JobRow, new: JobStatus) -> None:
    if not can_transition(job.status, new):
        raise InvalidTransition(
            f"Job {job.id} is {job.status} and cannot become {new.value}.",
            param="fine_tuning_job_id",
            code="invalid_job_state",
        )
    job.status = new.value
    if new in TERMINAL:
        job.finished_at = now()
        job.estimated_finish = None
