"""/v1/organization/webhooks: an organization's admin registers where its jobs' ends are
sent (`fine_tuning.job.succeeded`, `.failed`, `.cancelled`) and sees what was delivered.

Admin keys only, scoped to the admin's organization, as the rest of /v1/organization. The
signing secret is in the answer that made the endpoint, never again.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request
from pydantic import BaseModel, Field, field_validator

from service.deps import AdminDep
from service.webhooks.endpoints import MAX_URL_LENGTH, WebhookEndpoints, endpoint_object
from service.webhooks.outbox import EVENT_TYPES

router = APIRouter(prefix="/v1/organization/webhooks", tags=["organization"])

KNOWN_EVENTS = tuple(EVENT_TYPES.values())


async def _webhooks(request: Request) -> WebhookEndpoints:
    return request.app.state.webhooks


WebhooksDep = Annotated[WebhookEndpoints, Depends(_webhooks)]


class CreateWebhookRequest(BaseModel):
    model_config = {"extra": "forbid"}

    # Checked by WebhookEndpoints (scheme, host, where it resolves), which names `url`.
    url: str = Field(min_length=1, max_length=MAX_URL_LENGTH)
    events: list[str] = Field(
        default_factory=lambda: list(KNOWN_EVENTS), min_length=1, max_length=len(KNOWN_EVENTS)
    )

    @field_validator("events")
    @classmethod
    def _known(cls, events: list[str]) -> list[str]:
        unknown = [event for event in events if event not in KNOWN_EVENTS]
        if unknown:
            raise ValueError(f"unknown event {unknown[0][:64]!r}; the events are {KNOWN_EVENTS}")
        return list(dict.fromkeys(events))  # each once, in the order asked


@router.post("")
def create_webhook(
    admin: AdminDep, webhooks: WebhooksDep, body: CreateWebhookRequest
) -> dict[str, Any]:
    row, secret = webhooks.create(admin.organization, body.url, body.events)
    return endpoint_object(row, secret)


@router.get("")
def list_webhooks(admin: AdminDep, webhooks: WebhooksDep) -> dict[str, Any]:
    rows = webhooks.of(admin.organization)  # at most MAX_ENDPOINTS_PER_ORGANIZATION
    return {
        "object": "list",
        "data": [endpoint_object(row) for row in rows],
        "first_id": rows[0].id if rows else None,
        "last_id": rows[-1].id if rows else None,
        "has_more": False,
    }


@router.get("/{webhook_id}")
def retrieve_webhook(admin: AdminDep, webhooks: WebhooksDep, webhook_id: str) -> dict[str, Any]:
    return endpoint_object(webhooks.get(admin.organization, webhook_id))


@router.delete("/{webhook_id}")
def delete_webhook(admin: AdminDep, webhooks: WebhooksDep, webhook_id: str) -> dict[str, Any]:
    webhooks.delete(admin.organization, webhook_id)
    return {"object": "organization.webhook.deleted", "id": webhook_id, "deleted": True}


@router.get("/{webhook_id}/deliveries")
def list_deliveries(
    admin: AdminDep,
    webhooks: WebhooksDep,
    webhook_id: str,
    after: str | None = Query(default=None, max_length=64),
    limit: int = Query(default=20, ge=1, le=100),
) -> dict[str, Any]:
    """Newest first, each with its attempts (status code or error, duration, time)."""
    page, has_more = webhooks.deliveries(admin.organization, webhook_id, after, limit)
    return {
        "object": "list",
        "data": page,
        "first_id": page[0]["id"] if page else None,
        "last_id": page[-1]["id"] if page else None,
        "has_more": has_more,
    }
