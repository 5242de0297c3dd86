"""Admission: which open jobs the scheduler steps, in which order, and whether a queued
job may start now.

Trainers are the scarce resource: at most `Settings.max_running_jobs` jobs may have one (or be
about to: starting, pausing, cancelling). Queued jobs are taken fairly across
organizations, so one tenant's long queue cannot starve the others.
"""

from __future__ import annotations

from typing import NamedTuple

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from service.config import Settings
from service.db import JobRow
from service.fine_tuning.lifecycle import TERMINAL, TRAINER_MAY_BE_ALIVE, JobStatus

ALIVE = [status.value for status in TRAINER_MAY_BE_ALIVE]
TERMINAL_VALUES = [status.value for status in TERMINAL]


class OpenJob(NamedTuple):
    id: str
    status: str
    step_failures: int
    organization: str


class Admission:
    def __init__(self, settings: Settings):
        self.settings = settings  # read each time: an operator may change the slots

    def in_turn(self, session: Session) -> list[OpenJob]:
        """Every open job, in the order a tick steps them: first those that are not
        queued (by arrival), then the queued ones round-robin across organizations,
        counting the trainers each already runs (its n-th queued job waits behind every
        other organization's first n), then by arrival."""
        rows = session.execute(
            select(JobRow.id, JobRow.status, JobRow.step_failures, JobRow.organization)
            .where(JobRow.status.not_in(TERMINAL_VALUES))
            .order_by(JobRow.arrival)
        ).all()
        alive: dict[str, int] = dict(
            session.execute(  # type: ignore[arg-type]
                select(JobRow.organization, func.count())
                .where(JobRow.status.in_(ALIVE))
                .group_by(JobRow.organization)
            ).all()
        )
        queued_before: dict[str, int] = {}

        def turn(job: OpenJob) -> tuple[bool, int]:
            if job.status != JobStatus.QUEUED:
                return (False, 0)
            rank = queued_before.get(job.organization, 0)
            queued_before[job.organization] = rank + 1
            return (True, alive.get(job.organization, 0) + rank)

        jobs = [OpenJob(*row) for row in rows]
        turns = {job.id: turn(job) for job in jobs}  # in arrival order
        return sorted(jobs, key=lambda job: turns[job.id])  # stable: arrival breaks ties

    def slots_full(self, session: Session) -> bool:
        """Whether no other trainer may start now."""
        return self.trainers_alive(session) >= self.settings.max_running_jobs

    @staticmethod
    def trainers_alive(session: Session) -> int:
        count = session.scalar(select(func.count()).where(JobRow.status.in_(ALIVE)))
        return count or 0
