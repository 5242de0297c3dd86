"""/v1/organization: an organization's admin manages its API keys and its W&B key.

Shaped as OpenAI's administration API: admin keys only (member keys get a 403), objects
`organization.api_key` with a `redacted_value`, the key's `value` only in the answer that
created it. Everything is scoped to the admin key's own organization: another
organization's key is a 404 here, as if it did not exist.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Query
from pydantic import BaseModel, Field, HttpUrl, field_validator

from service.db import ApiKeyRow
from service.deps import AdminDep, KeysDep, SecretsDep
from service.errors import InvalidRequest, NotFound
from service.organization.keys import MEMBER, Role
from service.organization.secrets import WANDB, described

router = APIRouter(prefix="/v1/organization", tags=["organization"])

# Keys an organization may hold at once (a bound, like every input).
MAX_KEYS_PER_ORGANIZATION = 1_000


class CreateKeyRequest(BaseModel):
    model_config = {"extra": "forbid"}

    name: str = Field(min_length=1, max_length=256)
    role: Role = MEMBER


class WandbIntegrationRequest(BaseModel):
    model_config = {"extra": "forbid"}

    api_key: str = Field(min_length=1, max_length=256)
    base_url: HttpUrl | None = Field(
        default=None, description="a self-hosted W&B server (https); W&B's cloud by default"
    )

    @field_validator("base_url")
    @classmethod
    def _https(cls, url: HttpUrl | None) -> HttpUrl | None:
        # The trainers call it from inside the cluster: not a way to reach plain-http
        # services there.
        if url is not None and url.scheme != "https":
            raise ValueError("base_url must be an https URL")
        return url


def key_object(row: ApiKeyRow, value: str | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {
        "object": "organization.api_key",
        "id": row.id,
        "name": row.name,
        "role": row.role,
        "redacted_value": row.redacted_value,
        "created_at": row.created_at,
        "last_used_at": row.last_used_at,
        "owner": {"type": "organization", "id": row.organization},
    }
    if value is not None:
        body["value"] = value  # shown once: only its hash is kept
    return body


@router.get("/api_keys")
def list_keys(
    admin: AdminDep,
    keys: KeysDep,
    after: str | None = Query(default=None, max_length=64),
    limit: int = Query(default=20, ge=1, le=100),
) -> dict[str, Any]:
    rows = keys.list(admin.organization)
    if after is not None:
        ids = [row.id for row in rows]
        rows = rows[ids.index(after) + 1 :] if after in ids else []
    page = rows[:limit]
    return {
        "object": "list",
        "data": [key_object(row) for row in page],
        "first_id": page[0].id if page else None,
        "last_id": page[-1].id if page else None,
        "has_more": len(rows) > limit,
    }


@router.post("/api_keys")
def create_key(admin: AdminDep, keys: KeysDep, body: CreateKeyRequest) -> dict[str, Any]:
    if len(keys.list(admin.organization)) >= MAX_KEYS_PER_ORGANIZATION:
        raise InvalidRequest(
            f"Your organization holds {MAX_KEYS_PER_ORGANIZATION} keys: revoke some first."
        )
    row, value = keys.create(admin.organization, body.name, body.role)
    return key_object(row, value)


@router.get("/api_keys/{key_id}")
def retrieve_key(admin: AdminDep, keys: KeysDep, key_id: str) -> dict[str, Any]:
    row = keys.get(admin.organization, key_id)
    if row is None:
        raise NotFound(f"No API key with id '{key_id}'", param="key_id")
    return key_object(row)


@router.delete("/api_keys/{key_id}")
def revoke_key(admin: AdminDep, keys: KeysDep, key_id: str) -> dict[str, Any]:
    row = keys.revoke(admin.organization, key_id)
    if row is None:
        raise NotFound(f"No API key with id '{key_id}'", param="key_id")
    return {"object": "organization.api_key.deleted", "id": row.id, "deleted": True}


@router.put("/integrations/wandb")
def register_wandb(
    admin: AdminDep, secrets: SecretsDep, body: WandbIntegrationRequest
) -> dict[str, Any]:
    """The W&B key this organization's jobs log with (`integrations: [{"type": "wandb"}]`)."""
    settings = {"base_url": str(body.base_url)} if body.base_url else {}
    secrets.put(admin.organization, WANDB, body.api_key, settings)
    row = secrets.get(admin.organization, WANDB)
    assert row is not None
    return described(row)


@router.get("/integrations/wandb")
def retrieve_wandb(admin: AdminDep, secrets: SecretsDep) -> dict[str, Any]:
    row = secrets.get(admin.organization, WANDB)
    if row is None:
        raise NotFound("Your organization has not registered a W&B API key")
    return described(row)


@router.delete("/integrations/wandb")
def delete_wandb(admin: AdminDep, secrets: SecretsDep) -> dict[str, Any]:
    if not secrets.delete(admin.organization, WANDB):
        raise NotFound("Your organization has not registered a W&B API key")
    return {"object": "organization.integration.deleted", "type": WANDB, "deleted": True}
