"""/v1/fine_tuning/alpha/graders: thin HTTP mapping onto GraderService."""

from __future__ import annotations

from fastapi import APIRouter

from service.deps import GatewayDep, GradersDep, HeavyDep, ModelsDep, TenantDep
from service.graders.schemas import (
    RunGraderRequest,
    RunGraderResponse,
    ValidateGraderRequest,
    ValidateGraderResponse,
)

router = APIRouter(prefix="/v1/fine_tuning/alpha/graders", tags=["fine-tuning"])


@router.post("/validate", response_model=ValidateGraderResponse)
async def validate_grader(
    tenant: TenantDep, graders: GradersDep, models: ModelsDep, request: ValidateGraderRequest
) -> ValidateGraderResponse:
    grader = await graders.validate(tenant, request.grader, models)
    return ValidateGraderResponse(grader=grader.model_dump(mode="json", exclude_none=True))


@router.post("/run", response_model=RunGraderResponse)
async def run_grader(
    tenant: TenantDep,
    graders: GradersDep,
    gateway: GatewayDep,
    models: ModelsDep,
    heavy: HeavyDep,
    request: RunGraderRequest,
) -> RunGraderResponse:
    return await graders.run(tenant, request, gateway, models, heavy.graders)
