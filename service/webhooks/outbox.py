"""The outbox: a job's end becomes webhook deliveries in the transaction that ends it.

A listener on every session's flush (service/db.py registers it) sees a job whose status
changes to one whose wire status is terminal (succeeded, failed, cancelled: `cancelling`
already reads `cancelled`, and what the API answered is final), and adds the event and one
delivery per endpoint of the organization that asked for that event. Whoever made the
change (the reconciler, a cancel request) commits them with it, or rolls them back with it:
no crash between the two loses an event or sends one for a change that did not happen.
"""

from __future__ import annotations

import json
import time
from typing import Any

from sqlalchemy import inspect, select
from sqlalchemy.orm import Session

from service.db import JobRow, WebhookDeliveryRow, WebhookEndpointRow, WebhookEventRow, now
from service.fine_tuning.lifecycle import wire_status
from service.ids import random_id

# The wire status a job ends in → the event that says so (OpenAI's names).
EVENT_TYPES = {
    "succeeded": "fine_tuning.job.succeeded",
    "failed": "fine_tuning.job.failed",
    "cancelled": "fine_tuning.job.cancelled",
}


def event_body(event_id: str, event_type: str, created_at: int, job_id: str) -> str:
    """OpenAI's thin payload; its bytes are what every attempt sends and signs."""
    return json.dumps(
        {
            "id": event_id,
            "object": "event",
            "type": event_type,
            "created_at": created_at,
            "data": {"id": job_id},
        },
        separators=(",", ":"),
    )


def _ending(job: JobRow, new: bool) -> str | None:
    """The event type of the change this flush writes to `job`, if it ends the job."""
    if new:
        return EVENT_TYPES.get(wire_status(job.status))
    history = inspect(job).attrs.status.history
    if not history.added:
        return None
    event_type = EVENT_TYPES.get(wire_status(history.added[-1]))
    before = history.deleted[0] if history.deleted else None
    if event_type is None or (before is not None and wire_status(before) in EVENT_TYPES):
        return None  # not an end, or already ended on the wire (cancelling → cancelled)
    return event_type


def write_job_webhooks(session: Session, _context: Any, _instances: Any) -> None:
    endings = [
        (job, event_type)
        for rows, new in ((session.new, True), (session.dirty, False))
        for job in rows
        if isinstance(job, JobRow) and (event_type := _ending(job, new)) is not None
    ]
    for job, event_type in endings:
        endpoints = [
            endpoint
            for endpoint in session.scalars(
                select(WebhookEndpointRow)
                .where(WebhookEndpointRow.organization == job.organization)
                .where(WebhookEndpointRow.disabled_at.is_(None))
                .order_by(WebhookEndpointRow.arrival)
            )
            if event_type in endpoint.events
        ]
        already = session.scalar(
            select(WebhookEventRow.id)
            .where(WebhookEventRow.job_id == job.id)
            .where(WebhookEventRow.type == event_type)
        )
        if not endpoints or already is not None:
            continue
        created_at = now()
        event = WebhookEventRow(
            id=random_id("evt_"),
            organization=job.organization,
            type=event_type,
            job_id=job.id,
            created_at=created_at,
        )
        event.body = event_body(event.id, event_type, created_at, job.id)
        session.add(event)
        for endpoint in endpoints:
            session.add(
                WebhookDeliveryRow(
                    id=random_id("wh_"),
                    event_id=event.id,
                    endpoint_id=endpoint.id,
                    organization=job.organization,
                    status="pending",
                    attempts=0,
                    next_attempt_at=time.time(),
                    created_at=created_at,
                )
            )
