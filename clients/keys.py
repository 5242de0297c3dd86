"""`ftaas keys list|create|get|revoke`: an organization's admin manages its API keys
(/v1/organization/api_keys, README "Organizations, keys and limits"). The SDK has no typed
method for these routes: its generic get/post/delete carry them."""

from __future__ import annotations

from typing import Any

import click
from pydantic import ValidationError

from clients.context import CommandContext, pass_context
from clients.errors import usage_error
from clients.output import when

KEYS = "/organization/api_keys"


@click.group("keys")
def keys_group() -> None:
    """Manage your organization's API keys (with an admin key)."""


@keys_group.command("list")
@click.option("--json", "as_json", is_flag=True, help="the API's objects, as JSON")
@pass_context
def list_command(ctx: CommandContext, as_json: bool) -> None:
    """The organization's keys (values redacted)."""
    found: list[dict[str, Any]] = []
    after: str | None = None
    while True:
        query: dict[str, Any] = {"limit": 100, **({"after": after} if after else {})}
        page = ctx.client.get(KEYS, cast_to=dict[str, Any], options={"params": query})
        found.extend(page.get("data", []))
        if not page.get("has_more") or not page.get("data"):
            break
        after = page["data"][-1]["id"]
    if as_json:
        ctx.output.json(found)
        return
    ctx.output.table(
        ["id", "name", "role", "redacted_value", "created", "last_used"],
        [
            [
                key["id"],
                key.get("name"),
                key.get("role"),
                key.get("redacted_value"),
                when(key.get("created_at")),
                when(key.get("last_used_at")),
            ]
            for key in found
        ],
    )


@keys_group.command("create")
@click.argument("name")
@click.option("--admin", is_flag=True, help="an admin key (manages keys) rather than a member's")
@pass_context
def create_command(ctx: CommandContext, name: str, admin: bool) -> None:
    """Create a key; its value is printed once, last."""
    from service.organization.router import CreateKeyRequest

    try:
        request = CreateKeyRequest.model_validate(
            {"name": name, "role": "admin" if admin else "member"}
        )
    except ValidationError as error:
        raise usage_error(error) from None
    key = ctx.client.post(KEYS, body=request.model_dump(mode="json"), cast_to=dict[str, Any])
    ctx.output.line(f"Created {key['role']} key {key['id']} ({key['name']}); shown once:")
    ctx.output.result(key["value"])


@keys_group.command("get")
@click.argument("key_id")
@pass_context
def get_command(ctx: CommandContext, key_id: str) -> None:
    """Show a key (JSON, value redacted)."""
    ctx.output.json(ctx.client.get(f"{KEYS}/{key_id}", cast_to=dict[str, Any]))


@keys_group.command("revoke")
@click.argument("key_id")
@pass_context
def revoke_command(ctx: CommandContext, key_id: str) -> None:
    """Revoke a key: it fails on its next request."""
    ctx.client.delete(f"{KEYS}/{key_id}", cast_to=dict[str, Any])
    ctx.output.line(f"Revoked {key_id}")
