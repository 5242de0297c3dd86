"""An organization's webhook endpoints, and what was delivered to them, as its admin sees
them. Every query is scoped to the organization: another's endpoint does not exist here."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import delete, func, select

from service.db import (
    Database,
    WebhookAttemptRow,
    WebhookDeliveryRow,
    WebhookEndpointRow,
    WebhookEventRow,
    lock_quotas,
)
from service.errors import InvalidRequest, NotFound
from service.ids import random_id
from service.webhooks.addresses import RefusedAddress, check_url
from service.webhooks.signing import new_secret

# Endpoints an organization may hold at once (a bound, like every input).
MAX_ENDPOINTS_PER_ORGANIZATION = 20
MAX_URL_LENGTH = 2048


def endpoint_object(row: WebhookEndpointRow, secret: str | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {
        "id": row.id,
        "object": "organization.webhook",
        "url": row.url,
        "events": list(row.events),
        "created_at": row.created_at,
        "status": "disabled" if row.disabled_at is not None else "enabled",
        "disabled_at": row.disabled_at,
        "disabled_reason": row.disabled_reason,
    }
    if secret is not None:
        body["secret"] = secret  # shown once: what signs the deliveries
    return body


def delivery_object(
    row: WebhookDeliveryRow, event: WebhookEventRow, attempts: Sequence[WebhookAttemptRow]
) -> dict[str, Any]:
    return {
        "id": row.id,  # the webhook-id header of every attempt
        "object": "organization.webhook.delivery",
        "webhook_id": row.endpoint_id,
        "event": {"id": event.id, "type": event.type, "job_id": event.job_id},
        "status": row.status,
        "created_at": row.created_at,
        "completed_at": row.completed_at,
        "next_attempt_at": int(row.next_attempt_at) if row.status == "pending" else None,
        "last_error": row.last_error,
        "attempts": [
            {
                "attempted_at": int(attempt.attempted_at),
                "status_code": attempt.status_code,
                "error": attempt.error,
                "duration_ms": attempt.duration_ms,
            }
            for attempt in attempts
        ],
    }


class WebhookEndpoints:
    def __init__(self, db: Database, allowed_hosts: tuple[str, ...]):
        self.db = db
        self.allowed_hosts = allowed_hosts

    def create(
        self, organization: str, url: str, events: list[str]
    ) -> tuple[WebhookEndpointRow, str]:
        if len(url) > MAX_URL_LENGTH:
            raise InvalidRequest(f"url must be at most {MAX_URL_LENGTH} characters", param="url")
        try:
            check_url(url, self.allowed_hosts)  # resolves the host: before any transaction
        except RefusedAddress as refusal:
            raise InvalidRequest(f"This webhook URL is refused: {refusal}.", param="url") from None
        secret = new_secret()
        with self.db.session() as session:
            lock_quotas(session, organization)  # the count and the insert, one at a time
            held = session.scalar(
                select(func.count())
                .select_from(WebhookEndpointRow)
                .where(WebhookEndpointRow.organization == organization)
            )
            if (held or 0) >= MAX_ENDPOINTS_PER_ORGANIZATION:
                raise InvalidRequest(
                    f"Your organization holds {MAX_ENDPOINTS_PER_ORGANIZATION} webhook "
                    "endpoints: delete some first."
                )
            row = WebhookEndpointRow(
                id=random_id("whep_"),
                organization=organization,
                url=url,
                events=events,
                secret=secret,
            )
            session.add(row)
        return row, secret

    def of(self, organization: str) -> list[WebhookEndpointRow]:
        with self.db.session() as session:
            return list(
                session.scalars(
                    select(WebhookEndpointRow)
                    .where(WebhookEndpointRow.organization == organization)
                    .order_by(WebhookEndpointRow.arrival)
                )
            )

    def get(self, organization: str, endpoint_id: str) -> WebhookEndpointRow:
        with self.db.session() as session:
            row = session.get(WebhookEndpointRow, endpoint_id)
            if row is None or row.organization != organization:
                raise NotFound(f"No webhook with id '{endpoint_id}'", param="webhook_id")
            return row

    def delete(self, organization: str, endpoint_id: str) -> None:
        """The endpoint and its deliveries: nothing more is sent to it (an attempt in
        flight ends unrecorded)."""
        with self.db.session() as session:
            row = session.get(WebhookEndpointRow, endpoint_id, with_for_update=True)
            if row is None or row.organization != organization:
                raise NotFound(f"No webhook with id '{endpoint_id}'", param="webhook_id")
            deliveries = select(WebhookDeliveryRow.id).where(
                WebhookDeliveryRow.endpoint_id == endpoint_id
            )
            session.execute(
                delete(WebhookAttemptRow).where(WebhookAttemptRow.delivery_id.in_(deliveries))
            )
            session.execute(
                delete(WebhookDeliveryRow).where(WebhookDeliveryRow.endpoint_id == endpoint_id)
            )
            session.delete(row)

    def deliveries(
        self, organization: str, endpoint_id: str, after: str | None, limit: int
    ) -> tuple[list[dict[str, Any]], bool]:
        """The endpoint's deliveries, newest first, with their attempts in order."""
        self.get(organization, endpoint_id)
        with self.db.session() as session:
            query = (
                select(WebhookDeliveryRow, WebhookEventRow)
                .join(WebhookEventRow, WebhookEventRow.id == WebhookDeliveryRow.event_id)
                .where(WebhookDeliveryRow.endpoint_id == endpoint_id)
                .where(WebhookDeliveryRow.organization == organization)
                .order_by(WebhookDeliveryRow.arrival.desc(), WebhookDeliveryRow.id.desc())
            )
            if after is not None:
                cursor = session.get(WebhookDeliveryRow, after)
                if cursor is None or cursor.endpoint_id != endpoint_id:
                    return [], False
                query = query.where(WebhookDeliveryRow.arrival < cursor.arrival)
            rows = session.execute(query.limit(limit + 1)).all()
            page = rows[:limit]
            ids = [delivery.id for delivery, _ in page]
            attempts: dict[str, list[WebhookAttemptRow]] = {i: [] for i in ids}
            for attempt in session.scalars(
                select(WebhookAttemptRow)
                .where(WebhookAttemptRow.delivery_id.in_(ids))
                .order_by(WebhookAttemptRow.seq)
            ):
                attempts[attempt.delivery_id].append(attempt)
            return (
                [delivery_object(d, e, attempts[d.id]) for d, e in page],
                len(rows) > limit,
            )
