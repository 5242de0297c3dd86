"""The job life cycle as an explicit state machine: the reconciler and the routes step it.

The store keeps more states than the wire shows. The extra ones say whether a trainer may
still be alive, which the scheduler must know to never lose or duplicate one (ALLOWED
below is the whole table):

- `starting`: the attempt (its number, submission id and output folder) is committed, and
  the launcher is being asked to run it. A crash here is resumed by adopting the
  submission if the launcher knows it, or submitting it again if not.
- `pausing`: the trainer was asked to save and stop and has not stopped yet.
- `resuming`: resumed while still pausing; it is queued once that trainer has stopped.
- `cancelling`: cancelled while a trainer may be alive; cancelled once it has stopped.

On the wire (OpenAI's statuses): starting and resuming read `queued`, pausing reads
`paused`, cancelling reads `cancelled`; what the API answered is final.
"""

from __future__ import annotations

from enum import StrEnum

from service.db import JobRow, now
from service.errors import Conflict


class JobStatus(StrEnum):
    VALIDATING_FILES = "validating_files"
    QUEUED = "queued"
    STARTING = "starting"
    RUNNING = "running"
    PAUSING = "pausing"
    PAUSED = "paused"
    RESUMING = "resuming"
    CANCELLING = "cancelling"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


S = JobStatus
TERMINAL = frozenset({S.SUCCEEDED, S.FAILED, S.CANCELLED})
# A trainer may be alive in these states: they hold a slot of `max_running_jobs`, and
# leaving them means the launcher has confirmed that it ended.
TRAINER_MAY_BE_ALIVE = frozenset({S.STARTING, S.RUNNING, S.PAUSING, S.RESUMING, S.CANCELLING})

WIRE_STATUS: dict[JobStatus, str] = {
    **{status: status.value for status in JobStatus},
    S.STARTING: S.QUEUED.value,
    S.RESUMING: S.QUEUED.value,
    S.PAUSING: S.PAUSED.value,
    S.CANCELLING: S.CANCELLED.value,
}

ALLOWED: dict[JobStatus, frozenset[JobStatus]] = {
    S.VALIDATING_FILES: frozenset({S.QUEUED, S.FAILED, S.CANCELLED}),
    # queued → paused: ftaas also pauses a job that has not started (OpenAI: running only).
    S.QUEUED: frozenset({S.STARTING, S.PAUSED, S.FAILED, S.CANCELLED}),
    # starting → queued: the launcher refused the attempt for good; failed after retries.
    S.STARTING: frozenset({S.RUNNING, S.QUEUED, S.PAUSING, S.CANCELLING, S.FAILED}),
    # running → queued: the launcher lost the job (its cluster restarted); run it again.
    S.RUNNING: frozenset({S.SUCCEEDED, S.FAILED, S.PAUSING, S.CANCELLING, S.QUEUED}),
    # pausing → succeeded | failed: the trainer ended before it saw the pause request.
    S.PAUSING: frozenset({S.PAUSED, S.RESUMING, S.CANCELLING, S.SUCCEEDED, S.FAILED}),
    S.RESUMING: frozenset({S.QUEUED, S.PAUSING, S.CANCELLING, S.SUCCEEDED, S.FAILED}),
    S.PAUSED: frozenset({S.QUEUED, S.CANCELLED, S.FAILED}),
    S.CANCELLING: frozenset({S.CANCELLED}),
    S.SUCCEEDED: frozenset(),
    S.FAILED: frozenset(),
    S.CANCELLED: frozenset(),
}

# What a user's request moves a job to, from each state that allows it.
ON_CANCEL: dict[JobStatus, JobStatus] = {
    **{status: S.CANCELLED for status in (S.VALIDATING_FILES, S.QUEUED, S.PAUSED)},
    **{status: S.CANCELLING for status in (S.STARTING, S.RUNNING, S.PAUSING, S.RESUMING)},
}
ON_PAUSE: dict[JobStatus, JobStatus] = {
    S.QUEUED: S.PAUSED,
    S.STARTING: S.PAUSING,
    S.RUNNING: S.PAUSING,
    S.RESUMING: S.PAUSING,
}
ON_RESUME: dict[JobStatus, JobStatus] = {S.PAUSED: S.QUEUED, S.PAUSING: S.RESUMING}


class InvalidTransition(Conflict):
    pass


def wire_status(status: str) -> str:
    return WIRE_STATUS[JobStatus(status)]


def can_transition(current: str, new: JobStatus) -> bool:
    return new in ALLOWED[JobStatus(current)]


def transition(job: JobRow, new: JobStatus) -> None:
    if not can_transition(job.status, new):
        raise InvalidTransition(
            f"Job {job.id} is {wire_status(job.status)} and cannot become {WIRE_STATUS[new]}.",
            param="fine_tuning_job_id",
            code="invalid_job_state",
        )
    job.status = new.value
    if new in TERMINAL:
        job.finished_at = now()
    if new in TERMINAL or new in (S.PAUSING, S.PAUSED, S.QUEUED):
        job.estimated_finish = None  # no longer counting down


def requested(job: JobRow, table: dict[JobStatus, JobStatus], verb: str) -> JobStatus:
    """The state a user's `verb` moves the job to, or a 409 saying why it cannot."""
    target = table.get(JobStatus(job.status))
    if target is None:
        raise InvalidTransition(
            f"Job {job.id} is {wire_status(job.status)} and cannot be {verb}.",
            param="fine_tuning_job_id",
            code="invalid_job_state",
        )
    return target
