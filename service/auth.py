"""Who is asking: an API key maps to an organization (the tenant) and a role."""

from __future__ import annotations

from dataclasses import dataclass

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
