"""The webhook sender: delivers the outbox (service/webhooks/outbox.py), at least once.

Every API process runs one. A sender claims a due delivery with a conditional UPDATE (its
`claimed_until`, a few request timeouts ahead), so two processes never send the same one
at once; one that dies while sending leaves the claim to expire, and the delivery is sent
again with the same `webhook-id` (at least once: receivers dedupe on it). Each attempt is
recorded (status code or error, duration, time); a 2xx ends the delivery, anything else (a
3xx too: redirects are not followed, a timeout, a refused address, a failed connection) is
retried after the next of FTAAS_WEBHOOK_RETRY_DELAYS, later if the receiver asks with
`Retry-After`, until they run out. A 410 Gone disables the endpoint.

Requests go only to addresses service/webhooks/addresses.py allows, checked after
resolution, and to the very address checked: the URL's host is replaced by that IP, with
the Host header and TLS name (SNI and certificate check) of the URL. No proxy from the
environment is used, bodies of answers are not read, at most `CONCURRENCY` at once.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import certifi
import httpx
from prometheus_client import CollectorRegistry, Counter
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy import func, or_, select, update
from sqlalchemy.orm import Session

from service.config import Settings
from service.db import (
    Database,
    WebhookAttemptRow,
    WebhookDeliveryRow,
    WebhookEndpointRow,
    WebhookEventRow,
    changed_rows,
    now,
)
from service.webhooks.addresses import RefusedAddress, allowed_host, checked_addresses
from service.webhooks.signing import signed_headers

logger = logging.getLogger(__name__)

CONCURRENCY = 8  # requests in flight per process
POLL_S = 1.0
MAX_RETRY_AFTER_S = 86_400.0
STATUSES = ("pending", "succeeded", "failed")


@dataclass(frozen=True)
class Claimed:
    id: str
    endpoint_id: str
    url: str
    secret: str
    body: bytes


@dataclass(frozen=True)
class Outcome:
    status_code: int | None = None
    error: str | None = None
    retry_after_s: float | None = None

    @property
    def delivered(self) -> bool:
        return self.status_code is not None and 200 <= self.status_code < 300

    @property
    def kind(self) -> str:
        """The metric's label."""
        if self.delivered:
            return "delivered"
        return "http_error" if self.status_code is not None else (self.error or "").split(":")[0]


class WebhookSender:
    def __init__(
        self,
        db: Database,
        settings: Settings,
        registry: CollectorRegistry | None = None,
        clock: Callable[[], float] = time.time,
    ):
        self.db = db
        self.delays = settings.webhook_retry_delays_s
        self.allowed = settings.webhook_allowed_host_names
        self.timeout_s = settings.webhook_timeout_s
        # Long enough that a claim never runs out while its request may still be running.
        self.claim_s = 2 * self.timeout_s + 30
        self.clock = clock
        # Made once: loading the CA bundle for every attempt would cost more than it sends.
        self.tls = ssl.create_default_context(cafile=certifi.where())
        registry = registry if registry is not None else CollectorRegistry()
        self.attempts = Counter(
            "ftaas_webhook_attempts",
            "Webhook POSTs this process made, by outcome (delivered, http_error, timeout, "
            "connection_error, refused)",
            ["outcome"],
            registry=registry,
        )
        registry.register(DeliveryCollector(db))

    async def run(self) -> None:
        """Claim what is due as room frees up: a slow receiver holds one of CONCURRENCY
        places until its timeout, never the others' deliveries."""
        sending: set[asyncio.Task[None]] = set()
        try:
            while True:
                try:
                    room = CONCURRENCY - len(sending)
                    for claimed in await asyncio.to_thread(self.claim, room) if room else []:
                        task = asyncio.create_task(self.deliver(claimed))
                        sending.add(task)
                        task.add_done_callback(sending.discard)
                except Exception:
                    logger.exception("webhook deliveries could not be claimed")
                await asyncio.sleep(POLL_S)
        finally:
            for task in list(sending):  # their claims run out: sent again by whoever is next
                task.cancel()

    async def deliver_due(self) -> int:
        """Send what is due now (at most CONCURRENCY); how many were sent."""
        claimed = await asyncio.to_thread(self.claim, CONCURRENCY)
        await asyncio.gather(*(self.deliver(delivery) for delivery in claimed))
        return len(claimed)

    # --- the store
    def claim(self, limit: int) -> list[Claimed]:
        at = self.clock()
        free = or_(
            WebhookDeliveryRow.claimed_until.is_(None), WebhookDeliveryRow.claimed_until < at
        )
        with self.db.session() as session:
            due = list(
                session.scalars(
                    select(WebhookDeliveryRow.id)
                    .where(WebhookDeliveryRow.status == "pending")
                    .where(WebhookDeliveryRow.next_attempt_at <= at)
                    .where(free)
                    .order_by(WebhookDeliveryRow.next_attempt_at)
                    .limit(limit)
                )
            )
        claimed = []
        for delivery_id in due:
            with self.db.session() as session:
                taken = session.execute(
                    update(WebhookDeliveryRow)
                    .where(WebhookDeliveryRow.id == delivery_id)
                    .where(WebhookDeliveryRow.status == "pending")
                    .where(free)
                    .values(claimed_until=at + self.claim_s)
                )
                if changed_rows(taken) != 1:
                    continue  # another sender took it
                row = session.execute(
                    select(WebhookDeliveryRow, WebhookEndpointRow, WebhookEventRow)
                    .join(
                        WebhookEndpointRow, WebhookEndpointRow.id == WebhookDeliveryRow.endpoint_id
                    )
                    .join(WebhookEventRow, WebhookEventRow.id == WebhookDeliveryRow.event_id)
                    .where(WebhookDeliveryRow.id == delivery_id)
                ).one()
                delivery, endpoint, event = row
                claimed.append(
                    Claimed(
                        delivery.id, endpoint.id, endpoint.url, endpoint.secret, event.body.encode()
                    )
                )
        return claimed

    def record(
        self, claimed: Claimed, outcome: Outcome, attempted_at: float, duration_ms: int
    ) -> None:
        with self.db.session() as session:
            delivery = session.get(WebhookDeliveryRow, claimed.id, with_for_update=True)
            if delivery is None:  # its endpoint was deleted meanwhile
                return
            session.add(
                WebhookAttemptRow(
                    delivery_id=delivery.id,
                    attempted_at=attempted_at,
                    status_code=outcome.status_code,
                    error=outcome.error,
                    duration_ms=duration_ms,
                )
            )
            delivery.attempts += 1
            delivery.claimed_until = None
            if delivery.status != "pending":  # its endpoint was disabled meanwhile
                return
            if outcome.delivered:
                delivery.status, delivery.completed_at, delivery.last_error = (
                    "succeeded",
                    now(),
                    None,
                )
                return
            delivery.last_error = outcome.error or f"the receiver answered {outcome.status_code}"
            if outcome.status_code == 410:
                self._disable(session, claimed.endpoint_id)
                return
            if delivery.attempts > len(self.delays):
                delivery.status, delivery.completed_at = "failed", now()
                return
            wait = self.delays[delivery.attempts - 1]
            if outcome.retry_after_s is not None:
                wait = max(wait, min(outcome.retry_after_s, MAX_RETRY_AFTER_S))
            delivery.next_attempt_at = self.clock() + wait

    def _disable(self, session: Session, endpoint_id: str) -> None:
        reason = "the receiver answered 410 Gone: nothing more is sent to this endpoint"
        endpoint = session.get(WebhookEndpointRow, endpoint_id)
        if endpoint is not None and endpoint.disabled_at is None:
            endpoint.disabled_at, endpoint.disabled_reason = now(), reason
        session.execute(
            update(WebhookDeliveryRow)
            .where(WebhookDeliveryRow.endpoint_id == endpoint_id)
            .where(WebhookDeliveryRow.status == "pending")
            .values(status="failed", completed_at=now(), last_error=reason, claimed_until=None)
        )

    # --- the wire
    async def deliver(self, claimed: Claimed) -> None:
        attempted_at, started = self.clock(), time.perf_counter()
        try:
            outcome = await asyncio.wait_for(self.send(claimed), self.timeout_s)
        except (TimeoutError, httpx.TimeoutException):
            outcome = Outcome(error=f"timeout: no answer within {self.timeout_s:g} s")
        except RefusedAddress as refusal:
            outcome = Outcome(error=f"refused: {refusal}")
        except httpx.HTTPError as error:
            outcome = Outcome(error=f"connection_error: {type(error).__name__}: {error}"[:500])
        except Exception as error:  # recorded and retried like any other failure
            logger.warning("webhook %s failed", claimed.id, exc_info=True)
            outcome = Outcome(error=f"connection_error: {type(error).__name__}: {error}"[:500])
        duration_ms = int((time.perf_counter() - started) * 1000)
        self.attempts.labels(outcome.kind).inc()
        try:
            await asyncio.to_thread(self.record, claimed, outcome, attempted_at, duration_ms)
        except Exception:  # the claim runs out and the delivery is sent again
            logger.exception("webhook %s: its attempt could not be recorded", claimed.id)

    async def send(self, claimed: Claimed) -> Outcome:
        url = httpx.URL(claimed.url)
        targets: list[str | None] = [None]  # an allowed host: as its URL says
        if not allowed_host(url.host, self.allowed):
            port = url.port or (443 if url.scheme == "https" else 80)
            targets = list(await asyncio.to_thread(checked_addresses, url.host, port))
        headers = signed_headers(claimed.secret, claimed.id, int(time.time()), claimed.body)
        failure: httpx.TransportError | None = None
        for address in targets:  # each checked address in turn, until one connects
            try:
                return await self._post(url, address, headers, claimed.body)
            except httpx.ConnectError as error:
                failure = error
        assert failure is not None
        raise failure

    async def _post(
        self, url: httpx.URL, address: str | None, headers: dict[str, str], body: bytes
    ) -> Outcome:
        extensions = {}
        if address is not None:
            headers = {**headers, "host": url.netloc.decode("ascii")}
            if url.scheme == "https":
                extensions["sni_hostname"] = url.host
            url = url.copy_with(host=address)
        async with httpx.AsyncClient(
            timeout=self.timeout_s, follow_redirects=False, trust_env=False, verify=self.tls
        ) as client:
            request = client.build_request(
                "POST", url, content=body, headers=headers, extensions=extensions
            )
            response = await client.send(request, stream=True)
            await response.aclose()  # the answer's body is not read
        return Outcome(status_code=response.status_code, retry_after_s=_seconds(response))


def _seconds(response: httpx.Response) -> float | None:
    value = response.headers.get("retry-after", "")
    return float(value) if value.isdigit() else None


class DeliveryCollector(Collector):
    """Webhook deliveries by status, counted in the job store when scraped."""

    def __init__(self, db: Database):
        self.db = db

    def collect(self) -> Iterator[Metric]:
        deliveries = GaugeMetricFamily(
            "ftaas_webhook_deliveries",
            "Webhook deliveries by status (pending: not yet delivered, retries to come)",
            labels=["status"],
        )
        try:
            with self.db.session() as session:
                rows = session.execute(
                    select(WebhookDeliveryRow.status, func.count()).group_by(
                        WebhookDeliveryRow.status
                    )
                ).all()
        except Exception:
            logger.warning("webhook deliveries could not be counted", exc_info=True)
            rows = []
        counts = {str(status): count for status, count in rows}
        for status in STATUSES:
            deliveries.add_metric([status], counts.get(status, 0))
        yield deliveries
