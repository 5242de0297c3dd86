"""The scheduler's lease: of all API processes on one job store, one schedules at a time.

A row in the store names the holder and when its hold expires. The holder renews it
before every tick and, with `keep`, between the jobs of a tick and after housekeeping
(a slow tick must not outlast the hold: another process would schedule beside it);
another process takes it over once it has expired (its holder died or hung), within
`ttl_s`. Taking and renewing are one conditional UPDATE each, so two processes can never
both believe they hold it for the same period.

A holder that stalls past its time (a long GC pause, a hung call) may still act on the
belief that it holds the lease. So every write of a tick is fenced (`fence`): in the
write's own transaction, the lease row must still name this holder at the generation it
took it with. A takeover raises the generation, and the two updates of one row serialise
in the database, so a stale holder's write rolls back instead of landing beside the new
holder's.
"""

from __future__ import annotations

import os
import secrets
import socket
import time
from collections.abc import Callable

from sqlalchemy import case, insert, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from service.db import Database, LeaseRow

SCHEDULER = "scheduler"


class LeaseLost(RuntimeError):
    """Another process took the lease over: this one must not write as the scheduler."""


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
        self.generation: int | None = None  # the lease's generation while this holds it

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
            # RETURNING (PostgreSQL, SQLite >= 3.35): the generation in the same statement,
            # one round trip per renewal rather than two.
            generation = connection.scalar(
                update(LeaseRow)
                .where(LeaseRow.name == self.name)
                .where(or_(LeaseRow.holder == self.holder, LeaseRow.expires_at < now))
                .values(
                    holder=self.holder,
                    expires_at=now + self.ttl_s,
                    generation=case(
                        (LeaseRow.holder == self.holder, LeaseRow.generation),
                        else_=LeaseRow.generation + 1,
                    ),
                )
                .returning(LeaseRow.generation)
            )
            if generation is not None:
                self._held_at = now
                self.generation = generation
                return True
            exists = connection.scalar(select(LeaseRow.name).where(LeaseRow.name == self.name))
        self._held_at = None
        self.generation = None
        if exists is not None:
            return False
        try:
            with self.db.engine.begin() as connection:
                connection.execute(
                    insert(LeaseRow).values(
                        name=self.name,
                        holder=self.holder,
                        expires_at=now + self.ttl_s,
                        generation=1,
                    )
                )
            self._held_at = now
            self.generation = 1
            return True
        except IntegrityError:  # another process made it first
            return False

    def fence(self, session: Session) -> None:
        """Check, inside `session`'s transaction, that this process still holds the lease
        at the generation it took it with; `LeaseLost` (the caller's transaction rolls
        back) if not. The no-op UPDATE locks the row until the transaction ends, so a
        takeover waits for this write or this write sees the takeover."""
        held = session.execute(
            update(LeaseRow)
            .where(LeaseRow.name == self.name)
            .where(LeaseRow.holder == self.holder)
            .where(LeaseRow.generation == (self.generation or 0))
            .values(generation=LeaseRow.generation)
        )
        if held.rowcount != 1:  # type: ignore[attr-defined]
            self._held_at = None
            raise LeaseLost(f"the {self.name} lease was taken over")

    def release(self) -> None:
        self._held_at = None
        self.generation = None
        with self.db.engine.begin() as connection:
            connection.execute(
                update(LeaseRow)
                .where(LeaseRow.name == self.name, LeaseRow.holder == self.holder)
                .values(expires_at=0.0)
            )
