"""The scheduler's lease: of all API processes on one job store, one schedules at a time.

A row in the store names the holder and when its hold expires. The holder renews it
before every tick and, with `keep`, between the jobs of a tick and after housekeeping
(a slow tick must not outlast the hold: another process would schedule beside it);
another process takes it over once it has expired (its holder died or hung), within
`ttl_s`. Taking and renewing are one conditional UPDATE each, so two processes can never
both believe they hold it for the same period.
"""

from __future__ import annotations

import os
import secrets
import socket
import time
from collections.abc import Callable

from sqlalchemy import insert, or_, select, update
from sqlalchemy.exc import IntegrityError

from service.db import Database, LeaseRow

SCHEDULER = "scheduler"


class Lease:
    def __init__(
        self,
        db: Database,
        name: str = SCHEDULER,
        ttl_s: float = 15.0,
        holder: str | None = None,
        clock: Callable[[], float] = time.time,
    ):
        self.db = db
        self.name = name
        self.ttl_s = ttl_s
        self.holder = holder or f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"
        self.clock = clock
        self._held_at: float | None = None  # when a hold (or renewal) last succeeded

    def keep(self) -> bool:
        """Whether this process still holds the lease: renewed once a third of its time
        has passed since the last renewal (cheap enough to ask before every job)."""
        if self._held_at is not None and self.clock() - self._held_at < self.ttl_s / 3:
            return True
        return self.hold()

    def hold(self) -> bool:
        """Take or renew the lease; whether this process holds it until now + ttl."""
        now = self.clock()
        with self.db.engine.begin() as connection:
            renewed = connection.execute(
                update(LeaseRow)
                .where(LeaseRow.name == self.name)
                .where(or_(LeaseRow.holder == self.holder, LeaseRow.expires_at < now))
                .values(holder=self.holder, expires_at=now + self.ttl_s)
            )
            if renewed.rowcount == 1:
                self._held_at = now
                return True
            exists = connection.scalar(select(LeaseRow.name).where(LeaseRow.name == self.name))
        self._held_at = None
        if exists is not None:
            return False
        try:
            with self.db.engine.begin() as connection:
                connection.execute(
                    insert(LeaseRow).values(
                        name=self.name, holder=self.holder, expires_at=now + self.ttl_s
                    )
                )
            self._held_at = now
            return True
        except IntegrityError:  # another process made it first
            return False

    def release(self) -> None:
        self._held_at = None
        with self.db.engine.begin() as connection:
            connection.execute(
                update(LeaseRow)
                .where(LeaseRow.name == self.name, LeaseRow.holder == self.holder)
                .values(expires_at=0.0)
            )
