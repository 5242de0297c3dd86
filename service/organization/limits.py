"""Per-organization rate limits and quotas, so no tenant can exhaust the machine.

- Requests per minute: a token bucket per organization (capacity one minute's worth,
  refilled continuously). Every answer carries OpenAI's `x-ratelimit-*-requests` headers;
  over the limit the answer is a 429 with `retry-after`, which the SDK waits and retries.
- Concurrent chat and completion requests: a count per organization, released when the
  answer (or the stream) ends; over it, a 429 with `retry-after: 1`.
- Stored bytes, files, and jobs not yet finished: counted in the database when something
  new would be added; over one, a 429 the SDK is told not to retry (`x-should-retry`).

Rates and concurrency are counted in each API process's memory, not in the job store: a
shared count would cost a database write (an fsync on SQLite, a contended row of the
organization on PostgreSQL) on every request, and two for every chat request, and a
process that dies holding slots would leak them. Several processes (uvicorn `--workers`,
several `serve` processes) each admit their share, the limit divided by `api_processes`
(`FTAAS_API_PROCESSES`, at least one request each), so together they admit the limit.
Quotas, which change rarely, are counted in the job store, one check of an organization at
a time (its row in `quota_locks`), and hold across every process.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from service.config import OrganizationLimits, Settings
from service.db import FileRow, JobRow, ModelRow, UploadRow, lock_quotas, now
from service.errors import QuotaExceeded, RateLimited
from service.fine_tuning.lifecycle import TERMINAL, JobStatus

# Jobs that count against `active_jobs`: all but finished and paused ones.
_NOT_ACTIVE = [s.value for s in TERMINAL] + [JobStatus.PAUSED.value]
RATE_HEADERS_STATE = "ratelimit_headers"


def duration(seconds: float) -> str:
    """OpenAI's reset format: `20ms`, `1s`, `6m0s`."""
    if seconds < 1:
        return f"{max(1, math.ceil(seconds * 1000))}ms"
    whole = math.ceil(seconds)
    minutes, rest = divmod(whole, 60)
    return f"{minutes}m{rest}s" if minutes else f"{rest}s"


@dataclass
class TokenBucket:
    capacity: int
    tokens: float
    updated: float
    per_second: float = field(init=False)

    def __post_init__(self) -> None:
        self.per_second = self.capacity / 60

    def take(self, moment: float) -> bool:
        self.tokens = min(self.capacity, self.tokens + (moment - self.updated) * self.per_second)
        self.updated = moment
        if self.tokens >= 1:
            self.tokens -= 1
            return True
        return False

    def headers(self) -> dict[str, str]:
        remaining = math.floor(self.tokens)
        return {
            "x-ratelimit-limit-requests": str(self.capacity),
            "x-ratelimit-remaining-requests": str(remaining),
            "x-ratelimit-reset-requests": duration((self.capacity - self.tokens) / self.per_second),
        }

    def wait_s(self) -> float:
        return max(0.0, (1 - self.tokens) / self.per_second)


class Limits:
    def __init__(self, settings: Settings, clock: Callable[[], float] = time.monotonic):
        self.settings = settings
        self.clock = clock
        self._lock = threading.Lock()
        self._buckets: dict[str, TokenBucket] = {}
        self._in_flight: dict[str, int] = {}

    def of(self, organization: str) -> OrganizationLimits:
        return self.settings.limits_of(organization)

    def share(self, limit: int) -> int:
        """This process's part of a rate or concurrency limit (module docstring)."""
        return max(1, limit // self.settings.api_processes)

    def _of_which(self, limit: int) -> str:
        """How a refusal names a share: `limit 1500 (this API process's share of 3000)`."""
        if self.settings.api_processes == 1:
            return ""
        return f" (this API process's share of {limit})"

    # --- rates
    def admit_request(self, request: Any, organization: str) -> None:
        """Take one request from the organization's bucket, or refuse with a 429; the
        headers ride on the answer either way (service/organization/limits.py)."""
        per_minute = self.of(organization).requests_per_minute
        capacity = self.share(per_minute)
        with self._lock:
            moment = self.clock()
            bucket = self._buckets.get(organization)
            if bucket is None or bucket.capacity != capacity:
                bucket = self._buckets[organization] = TokenBucket(capacity, capacity, moment)
            admitted = bucket.take(moment)
            headers = bucket.headers()
            wait = bucket.wait_s()
        setattr(request.state, RATE_HEADERS_STATE, headers)
        if not admitted:
            raise RateLimited(
                f"Rate limit reached for requests per minute (RPM): limit {capacity}"
                f"{self._of_which(per_minute)}. "
                f"Please try again in {duration(wait)}.",
                code="rate_limit_exceeded",
                headers={
                    **headers,
                    "retry-after": str(max(1, math.ceil(wait))),
                    "retry-after-ms": str(max(1, math.ceil(wait * 1000))),
                },
            )

    # --- concurrency
    def inference_slot(self, organization: str) -> Callable[[], None]:
        """Hold one of the organization's concurrent inference slots; the returned function
        gives it back (calling it again does nothing)."""
        at_once = self.of(organization).concurrent_requests
        limit = self.share(at_once)
        with self._lock:
            held = self._in_flight.get(organization, 0)
            if held >= limit:
                raise RateLimited(
                    f"Too many requests in flight: your organization may have {limit} chat "
                    f"or completion requests answered at once{self._of_which(at_once)}. "
                    "Please try again shortly.",
                    code="concurrency_limit_exceeded",
                    headers={"retry-after": "1", "retry-after-ms": "1000"},
                )
            self._in_flight[organization] = held + 1
        released = False

        def release() -> None:
            nonlocal released
            with self._lock:
                if not released:
                    released = True
                    self._in_flight[organization] -= 1

        return release

    def in_flight(self, organization: str) -> int:
        with self._lock:
            return self._in_flight.get(organization, 0)

    # --- quotas (counted in the caller's transaction, under the organization's quota
    # row: the caller adds what was checked before it commits, and a concurrent check
    # of the same organization waits for that commit, then counts it)
    def check_storage(
        self, session: Session, organization: str, adding_bytes: int, param: str
    ) -> None:
        lock_quotas(session, organization)
        limits = self.of(organization)
        files, stored = session.execute(
            select(func.count(), func.coalesce(func.sum(FileRow.bytes), 0)).where(
                FileRow.organization == organization
            )
        ).one()
        pending = int(
            session.scalar(
                select(func.coalesce(func.sum(UploadRow.bytes), 0)).where(
                    UploadRow.organization == organization,
                    UploadRow.status == "pending",
                    UploadRow.expires_at > now(),
                )
            )
            or 0
        )
        stored += int(
            session.scalar(
                select(func.coalesce(func.sum(ModelRow.bytes), 0)).where(
                    ModelRow.organization == organization, ModelRow.job_id.is_(None)
                )
            )
            or 0
        )
        stored += int(
            session.scalar(
                select(func.coalesce(func.sum(JobRow.output_bytes), 0)).where(
                    JobRow.organization == organization, JobRow.outputs_expired_at.is_(None)
                )
            )
            or 0
        )
        if files + 1 > limits.files:
            raise QuotaExceeded(
                f"Your organization holds {files} files, its limit: delete some first.",
                param=param,
                code="file_quota_exceeded",
            )
        if stored + pending + adding_bytes > limits.storage_bytes:
            raise QuotaExceeded(
                f"Storing {adding_bytes} more bytes would exceed your organization's "
                f"{limits.storage_bytes} byte storage limit ({stored + pending} in use): "
                "delete files, tuned models or checkpoints first.",
                param=param,
                code="storage_quota_exceeded",
            )

    def check_jobs(self, session: Session, organization: str) -> None:
        limit = self.of(organization).active_jobs
        lock_quotas(session, organization)
        active = session.scalar(
            select(func.count()).where(
                JobRow.organization == organization, JobRow.status.not_in(_NOT_ACTIVE)
            )
        )
        if (active or 0) >= limit:
            raise QuotaExceeded(
                f"Your organization has {active} fine-tuning jobs queued or running, its "
                "limit: wait for some to finish, or cancel some.",
                code="job_quota_exceeded",
            )


class RateLimitHeaders:
    """Puts the organization's `x-ratelimit-*` headers on every answer that counted."""

    def __init__(self, app: Any):
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def send_with_headers(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                headers = (scope.get("state") or {}).get(RATE_HEADERS_STATE)
                if headers:
                    present = {k.lower() for k, _ in message.get("headers", [])}
                    extra = [
                        (k.encode(), v.encode())
                        for k, v in headers.items()
                        if k.encode() not in present
                    ]
                    message = {**message, "headers": [*message.get("headers", []), *extra]}
            await send(message)

        await self.app(scope, receive, send_with_headers)
