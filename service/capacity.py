"""Threads of their own for the API's heavy work, and a bound on how much of it waits.

FastAPI runs every sync route and dependency on one pool of 40 threads (anyio's default
limiter). Work that takes seconds (an adapter import; a training file's copy and
validation; an upload's parts and assembly) would hold those threads, and then every
request, authentication and /health included, waits for one. Each kind of heavy work
runs here on a limiter of its own, and past a bound, per organization and in all, it is a
429 at once: a queue of held connections and temporary files is only a slower way down.
Authentication has threads of its own too, so it never waits behind any route.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import anyio
import anyio.to_thread

from service.errors import RateLimited

T = TypeVar("T")

RETRY_AFTER = {"retry-after": "1", "retry-after-ms": "1000"}


class Capacity:
    """One kind of heavy work: `threads` run at once, `most` are admitted (the rest
    wait for a thread), an organization has at most `per_organization` of them."""

    def __init__(self, what: str, threads: int, most: int, per_organization: int):
        self.what = what
        self.limiter = anyio.CapacityLimiter(threads)
        self.most, self.per_organization = most, per_organization
        self._admitted: dict[str, int] = {}

    @property
    def admitted(self) -> int:
        return sum(self._admitted.values())

    async def run(self, organization: str, work: Callable[..., T], *args: Any) -> T:
        """`work(*args)` on this capacity's threads, or a 429 if it is full. Called on the
        event loop only, so the counts need no lock."""
        with self._admitted_for(organization):
            call = functools.partial(work, *args)
            return await anyio.to_thread.run_sync(call, limiter=self.limiter)

    async def run_async(
        self, organization: str, work: Callable[..., Awaitable[T]], *args: Any
    ) -> T:
        """`await work(*args)` (work that waits on processes or the network, not on a
        thread), counted as `run` counts, or a 429 if it is full."""
        with self._admitted_for(organization):
            return await work(*args)

    @contextlib.contextmanager
    def _admitted_for(self, organization: str) -> Iterator[None]:
        held = self._admitted.get(organization, 0)
        if held >= self.per_organization or self.admitted >= self.most:
            mine = held >= self.per_organization
            limit = self.per_organization if mine else self.most
            whose = "your organization has" if mine else "the server has"
            raise RateLimited(
                f"Too many {self.what} at once: {whose} {limit} in progress. Please try "
                "again shortly.",
                code="concurrency_limit_exceeded",
                headers=RETRY_AFTER,
            )
        self._admitted[organization] = held + 1
        try:
            yield
        finally:
            self._admitted[organization] -= 1
            if not self._admitted[organization]:
                del self._admitted[organization]


@dataclass
class HeavyWork:
    """The API's capacities (app.state.heavy)."""

    imports: Capacity
    files: Capacity
    graders: Capacity
    authentication: anyio.CapacityLimiter


def heavy_work() -> HeavyWork:
    return HeavyWork(
        # An import inflates an archive and checks it: bounded by the base model's
        # largest servable adapter (service/models/adapters.py), a few at a time.
        imports=Capacity("adapter imports", threads=2, most=4, per_organization=2),
        # A file's or part's copy, an upload's assembly, a training file's validation.
        files=Capacity("file uploads", threads=8, most=32, per_organization=8),
        # A grader run: a python grader's sandbox (up to 2 GB for up to its time limit)
        # or a judge model's answer; waits on processes and the engine, not threads.
        graders=Capacity("grader runs", threads=1, most=8, per_organization=4),
        authentication=anyio.CapacityLimiter(16),
    )
