"""The grader endpoints' logic: validate a grader, or grade one sample with it."""

from __future__ import annotations

import asyncio

from service.auth import Tenant
from service.capacity import Capacity
from service.chat.gateway import ServingGateway
from service.config import Settings
from service.errors import InvalidRequest
from service.graders.judge import GatewayJudge
from service.graders.schemas import RunGraderRequest, RunGraderResponse
from service.models.service import ModelService
from training.graders import (
    Grader,
    Graders,
    InvalidGrader,
    PythonSandbox,
    SandboxLimits,
    SandboxUnavailable,
    parse_grader,
    sample_from_text,
)
from training.graders.schemas import MultiGrader, PythonGrader


def _has_python(grader: Grader) -> bool:
    if isinstance(grader, MultiGrader):
        return any(isinstance(g, PythonGrader) for g in grader.graders.values())
    return isinstance(grader, PythonGrader)


class GraderService:
    def __init__(self, settings: Settings):
        self.settings = settings
        self.sandbox = PythonSandbox(
            settings.python_grader_sandbox,
            SandboxLimits(timeout_s=settings.python_grader_timeout_s),
            hidden=[settings.home],  # never visible, even inside a bound folder
        )

    async def validate(self, raw: dict[str, object]) -> Grader:
        """The grader, or a 400 naming the field; a python grader also needs a sandbox
        on this server (fail closed)."""
        try:
            grader = parse_grader(raw)
        except InvalidGrader as error:
            raise InvalidRequest(error.message, param=error.param) from None
        if _has_python(grader):
            try:
                await asyncio.to_thread(self.sandbox.check)
            except SandboxUnavailable as error:
                raise InvalidRequest(
                    f"python graders cannot run on this server: {error}",
                    param="grader",
                    code="python_grader_unavailable",
                ) from None
        return grader

    async def run(
        self,
        tenant: Tenant,
        request: RunGraderRequest,
        gateway: ServingGateway,
        models: ModelService,
        capacity: Capacity,
    ) -> RunGraderResponse:
        try:
            grader = parse_grader(request.grader)
        except InvalidGrader as error:
            raise InvalidRequest(error.message, param=error.param) from None
        graders = Graders(GatewayJudge(self.settings, gateway, models, tenant), self.sandbox)
        sample, item = sample_from_text(request.model_sample), request.item or {}
        # Bounded: a python grader is a process of up to 2 GB for up to its time limit.
        result = await capacity.run_async(tenant.organization, graders.grade, grader, sample, item)
        return RunGraderResponse.of(result)
