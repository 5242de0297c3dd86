"""Typed dependencies: who is asking and which services a route uses, visible in signatures."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Header, Request

from service.auth import Tenant, tenant_for
from service.chat.gateway import ServingGateway
from service.config import Settings
from service.files.service import FileService
from service.fine_tuning.service import FineTuningService
from service.models.service import ModelService
from service.organization.keys import KeyRing
from service.organization.limits import Limits
from service.organization.secrets import OrganizationSecrets
from service.uploads.service import UploadService


def _settings(request: Request) -> Settings:
    return request.app.state.settings


def _admitted(request: Request, authorization: str | None, admin: bool) -> Tenant:
    """The key's holder, once its organization's rate allows one more request."""
    tenant = tenant_for(request.app.state.keys, authorization, admin=admin)
    request.app.state.limits.admit_request(request, tenant.organization)
    return tenant


def _tenant(request: Request, authorization: Annotated[str | None, Header()] = None) -> Tenant:
    return _admitted(request, authorization, admin=False)


def _admin(request: Request, authorization: Annotated[str | None, Header()] = None) -> Tenant:
    return _admitted(request, authorization, admin=True)


def _files(request: Request) -> FileService:
    return request.app.state.files


def _uploads(request: Request) -> UploadService:
    return request.app.state.uploads


def _jobs(request: Request) -> FineTuningService:
    return request.app.state.jobs


def _models(request: Request) -> ModelService:
    return request.app.state.models


def _gateway(request: Request) -> ServingGateway:
    return request.app.state.gateway


def _keys(request: Request) -> KeyRing:
    return request.app.state.keys


def _limits(request: Request) -> Limits:
    return request.app.state.limits


def _secrets(request: Request) -> OrganizationSecrets:
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
