"""The state table itself: every pair of states, what the wire shows, what users may do."""

import itertools

import pytest

from service.db import JobRow
from service.fine_tuning.lifecycle import (
    ALLOWED,
    ON_CANCEL,
    ON_PAUSE,
    ON_RESUME,
    TERMINAL,
    TRAINER_MAY_BE_ALIVE,
    InvalidTransition,
    JobStatus,
    requested,
    transition,
    wire_status,
)

S = JobStatus
OPENAI_STATUSES = {
    "validating_files",
    "queued",
    "running",
    "paused",
    "succeeded",
    "failed",
    "cancelled",
}


def job(status: JobStatus) -> JobRow:
    return JobRow(id="ftjob-x", status=status.value)


@pytest.mark.parametrize(("current", "new"), list(itertools.product(S, S)))
def test_every_pair_of_states_is_allowed_exactly_as_the_table_says(current, new):
    row = job(current)
    if new in ALLOWED[current]:
        transition(row, new)
        assert row.status == new.value
        assert (row.finished_at is not None) == (new in TERMINAL)
    else:
        with pytest.raises(InvalidTransition) as refused:
            transition(row, new)
        assert refused.value.status_code == 409 and row.status == current.value


def test_the_wire_shows_only_openai_statuses_and_internal_ones_read_as_their_outcome():
    assert {wire_status(s) for s in S} == OPENAI_STATUSES
    assert wire_status("starting") == wire_status("resuming") == "queued"
    assert wire_status("pausing") == "paused" and wire_status("cancelling") == "cancelled"


def test_terminal_states_allow_nothing_and_no_live_trainer_is_terminal():
    assert all(ALLOWED[s] == frozenset() for s in TERMINAL)
    assert not TRAINER_MAY_BE_ALIVE & TERMINAL
    # Leaving a state where a trainer may live goes through a state that says so, or an
    # end the launcher confirmed: cancelling never skips to cancelled from a live state.
    for status in TRAINER_MAY_BE_ALIVE - {S.CANCELLING}:
        assert S.CANCELLED not in ALLOWED[status]


@pytest.mark.parametrize("status", list(S))
def test_user_requests_follow_the_table(status):
    for table, verb in ((ON_CANCEL, "cancelled"), (ON_PAUSE, "paused"), (ON_RESUME, "resumed")):
        row = job(status)
        if status in table:
            assert table[status] in ALLOWED[status]
            assert requested(row, table, verb) == table[status]
        else:
            with pytest.raises(InvalidTransition, match=f"cannot be {verb}"):
                requested(row, table, verb)


def test_a_cancel_of_a_live_trainer_waits_for_it_and_of_anything_else_is_final():
    assert {s for s, t in ON_CANCEL.items() if t == S.CANCELLING} == TRAINER_MAY_BE_ALIVE - {
        S.CANCELLING
    }
    assert {s for s, t in ON_CANCEL.items() if t == S.CANCELLED} == {
        S.VALIDATING_FILES,
        S.QUEUED,
        S.PAUSED,
    }
