"""Who is asking: an API key maps to an organization (the tenant) and a role."""

from __future__ import annotations

import hmac
from dataclasses import dataclass

from service.config import Settings
from service.errors import AuthenticationFailed, PermissionDenied
from service.organization.keys import ADMIN, MEMBER, KeyRing, Role

OPEN_ACCESS_ORGANIZATION = "local"


@dataclass(frozen=True)
class Tenant:
    organization: str
    role: Role = MEMBER
    key_id: str | None = None


def tenant_for(keys: KeyRing, authorization: str | None, *, admin: bool = False) -> Tenant:
    """The key's holder; with no active key at all (open access), organization `local`,
    which may also manage itself. Admin keys manage, member keys use the API, as OpenAI's
    admin and project keys do."""
    scheme, _, value = (authorization or "").partition(" ")
    value = value.strip()
    holder = keys.authenticate(value) if scheme.lower() == "bearer" and value else None
    if holder is None:
        if keys.open_access():
            return Tenant(OPEN_ACCESS_ORGANIZATION, ADMIN)
        if not value:
            raise AuthenticationFailed(
                "You didn't provide an API key. Send it as `Authorization: Bearer <key>`.",
                code="missing_api_key",
            )
        raise AuthenticationFailed("Incorrect API key provided.", code="invalid_api_key")
    if admin and holder.role != ADMIN:
        raise PermissionDenied(
            "This endpoint needs an admin API key of your organization.",
            code="insufficient_permissions",
        )
    if not admin and holder.role == ADMIN:
        raise PermissionDenied(
            "Admin API keys manage an organization (/v1/organization); use an API key for "
            "this endpoint.",
            code="insufficient_permissions",
        )
    return Tenant(holder.organization, holder.role, holder.key_id)


def admit_scraper(settings: Settings, keys: KeyRing, authorization: str | None) -> None:
    """/metrics names every organization's models: it is the operator's, opened by
    FTAAS_METRICS_KEY, or by nothing on an open-access (loopback-only) server."""
    scheme, _, value = (authorization or "").partition(" ")
    expected = settings.metrics_key
    if expected:
        if scheme.lower() == "bearer" and hmac.compare_digest(value.strip(), expected):
            return
        raise AuthenticationFailed(
            "Send FTAAS_METRICS_KEY as `Authorization: Bearer <key>` to read /metrics.",
            code="invalid_api_key",
        )
    if not keys.open_access():
        raise PermissionDenied(
            "This server has API keys: set FTAAS_METRICS_KEY to scrape /metrics with it.",
            code="metrics_key_not_set",
        )
