"""Typed dependencies: who is asking and which services a route uses, visible in signatures.

All are `async`: FastAPI runs a sync dependency on the shared pool of worker threads,
which a route's work may hold (service/capacity.py); authentication's database read runs
on threads of its own.
"""

from __future__ import annotations

from typing import Annotated

import anyio.to_thread
from fastapi import Depends, Header, Request

from service.auth import Tenant, tenant_for
from service.capacity import HeavyWork
from service.chat.gateway import ServingGateway
from service.config import Settings
from service.files.service import FileService
from service.fine_tuning.service import FineTuningService
from service.graders.service import GraderService
from service.models.service import ModelService
from service.organization.keys import KeyRing
from service.organization.limits import Limits
from service.organization.secrets import OrganizationSecrets
from service.uploads.service import UploadService


async def _settings(request: Request) -> Settings:
    return request.app.state.settings


def _admitted(request: Request, authorization: str | None, admin: bool) -> Tenant:
    """The key's holder, once its organization's rate allows one more request."""
    tenant = tenant_for(request.app.state.keys, authorization, admin=admin)
    request.app.state.limits.admit_request(request, tenant.organization)
    return tenant


async def _authenticated(request: Request, authorization: str | None, admin: bool) -> Tenant:
    limiter = request.app.state.heavy.authentication
    return await anyio.to_thread.run_sync(_admitted, request, authorization, admin, limiter=limiter)


async def _tenant(
    request: Request, authorization: Annotated[str | None, Header()] = None
) -> Tenant:
    return await _authenticated(request, authorization, admin=False)


async def _admin(request: Request, authorization: Annotated[str | None, Header()] = None) -> Tenant:
    return await _authenticated(request, authorization, admin=True)


async def _files(request: Request) -> FileService:
    return request.app.state.files


async def _uploads(request: Request) -> UploadService:
    return request.app.state.uploads


async def _jobs(request: Request) -> FineTuningService:
    return request.app.state.jobs


async def _models(request: Request) -> ModelService:
    return request.app.state.models


async def _gateway(request: Request) -> ServingGateway:
    return request.app.state.gateway


async def _graders(request: Request) -> GraderService:
    return request.app.state.graders


async def _keys(request: Request) -> KeyRing:
    return request.app.state.keys


async def _limits(request: Request) -> Limits:
    return request.app.state.limits


async def _heavy(request: Request) -> HeavyWork:
    return request.app.state.heavy


async def _secrets(request: Request) -> OrganizationSecrets:
    return request.app.state.secrets


SettingsDep = Annotated[Settings, Depends(_settings)]
TenantDep = Annotated[Tenant, Depends(_tenant)]
AdminDep = Annotated[Tenant, Depends(_admin)]
KeysDep = Annotated[KeyRing, Depends(_keys)]
LimitsDep = Annotated[Limits, Depends(_limits)]
SecretsDep = Annotated[OrganizationSecrets, Depends(_secrets)]
FilesDep = Annotated[FileService, Depends(_files)]
UploadsDep = Annotated[UploadService, Depends(_uploads)]
JobsDep = Annotated[FineTuningService, Depends(_jobs)]
ModelsDep = Annotated[ModelService, Depends(_models)]
GatewayDep = Annotated[ServingGateway, Depends(_gateway)]
GradersDep = Annotated[GraderService, Depends(_graders)]
HeavyDep = Annotated[HeavyWork, Depends(_heavy)]
