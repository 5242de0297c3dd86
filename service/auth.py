"""Who is asking: an API key maps to an organization (the tenant)."""

from __future__ import annotations

from dataclasses import dataclass

from service.config import Settings
from service.errors import AuthenticationFailed

OPEN_ACCESS_ORGANIZATION = "local"


@dataclass(frozen=True)
class Tenant:
    organization: str


def tenant_for(settings: Settings, authorization: str | None) -> Tenant:
    if settings.open_access:
        return Tenant(OPEN_ACCESS_ORGANIZATION)
    scheme, _, key = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not key:
        raise AuthenticationFailed(
            "You didn't provide an API key. Send it as `Authorization: Bearer <key>`.",
            code="missing_api_key",
        )
    organization = settings.api_key_organizations.get(key.strip())
    if organization is None:
        raise AuthenticationFailed("Incorrect API key provided.", code="invalid_api_key")
    return Tenant(organization)
