import pytest

from service.db import JobRow
from service.fine_tuning.lifecycle import (
    ALLOWED,
    TERMINAL,
    InvalidTransition,
    JobStatus,
    transition,
)


def job(status: JobStatus) -> JobRow:
    return JobRow(id="ftjob-x", status=status.value)


def test_terminal_states_allow_nothing():
    for status in TERMINAL:
        assert ALLOWED[status] == frozenset()


def test_the_normal_path_and_its_finish_time():
    row = job(JobStatus.VALIDATING_FILES)
    for status in (JobStatus.QUEUED, JobStatus.RUNNING, JobStatus.SUCCEEDED):
        transition(row, status)
    assert row.status == "succeeded" and row.finished_at is not None


def test_pause_and_resume_go_through_queued():
    row = job(JobStatus.RUNNING)
    transition(row, JobStatus.PAUSED)
    transition(row, JobStatus.QUEUED)
    assert row.status == "queued"


@pytest.mark.parametrize("status", [JobStatus.SUCCEEDED, JobStatus.QUEUED])
def test_a_finished_job_cannot_change(status):
    with pytest.raises(InvalidTransition):
        transition(job(JobStatus.CANCELLED), status)
