"""The grader endpoints' logic: validate a grader, or grade one sample with it."""

from __future__ import annotations

import asyncio
import dataclasses
from typing import Any

from starlette.concurrency import run_in_threadpool

from service.auth import Tenant
from service.capacity import Capacity
from service.chat.gateway import ServingGateway
from service.config import Settings
from service.errors import InvalidRequest, NotFound
from service.graders.judge import GatewayJudge, local_judge_model
from service.graders.schemas import RunGraderRequest, RunGraderResponse
from service.models.service import InferenceTarget, ModelService
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
from training.graders.schemas import LabelModelGrader, MultiGrader, PythonGrader, ScoreModelGrader
from training.spec import JudgeTarget


def _has_python(grader: Grader) -> bool:
    if isinstance(grader, MultiGrader):
        return any(isinstance(g, PythonGrader) for g in grader.graders.values())
    return isinstance(grader, PythonGrader)


def _judge_models(grader: Grader) -> list[tuple[str, str]]:
    """(field, model) of each model grader's judge."""
    if isinstance(grader, ScoreModelGrader):
        return [("grader.model", grader.model)]
    if isinstance(grader, MultiGrader):
        return [
            (f"grader.graders.{key}.model", sub.model)
            for key, sub in grader.graders.items()
            if isinstance(sub, ScoreModelGrader | LabelModelGrader)
        ]
    return []


class GraderService:
    def __init__(self, settings: Settings):
        self.settings = settings
        self.sandbox = PythonSandbox(
            settings.python_grader_sandbox,
            SandboxLimits(timeout_s=settings.python_grader_timeout_s),
            hidden=[settings.home],  # never visible, even inside a bound folder
        )

    async def validate(
        self, tenant: Tenant, raw: dict[str, object], models: ModelService
    ) -> Grader:
        """The grader, or a 400 naming the field (a 404 for a judge model the caller
        cannot use); a python grader also needs a sandbox on this server (fail closed)."""
        grader = await self._parse(tenant, raw, models)
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

    def check_training_grader(
        self, tenant: Tenant, raw: dict[str, Any], models: ModelService
    ) -> tuple[dict[str, Any], dict[str, JudgeTarget]]:
        """A reinforcement job's grader, as the job keeps it, and its model graders'
        judges resolved for the caller (the trainer asks them through serving); a 400
        naming the field when it does not validate or has python graders this server cannot
        sandbox, a 404 for a judge model the caller cannot use."""
        root = "method.reinforcement.grader"
        try:
            grader = parse_grader(raw, root=root)
        except InvalidGrader as error:
            raise InvalidRequest(error.message, param=error.param) from None
        judged = _judge_models(grader)
        if judged and not self.settings.serving_enabled:
            raise InvalidRequest(
                "score_model and label_model graders need a model this server serves, and "
                "serving is disabled on it (FTAAS_SERVING_ENABLED=false)",
                param=f"method.reinforcement.{judged[0][0]}",
                code="unsupported_grader",
            )
        judges = {
            model: JudgeTarget(
                **dataclasses.asdict(
                    self._judge(tenant, models, f"method.reinforcement.{param}", model)
                )
            )
            for param, model in judged
        }
        if _has_python(grader):
            try:
                self.sandbox.check()
            except SandboxUnavailable as error:
                raise InvalidRequest(
                    f"python graders cannot run on this server: {error}",
                    param=root,
                    code="python_grader_unavailable",
                ) from None
        return grader.model_dump(mode="json", exclude_none=True), judges

    async def run(
        self,
        tenant: Tenant,
        request: RunGraderRequest,
        gateway: ServingGateway,
        models: ModelService,
        capacity: Capacity,
    ) -> RunGraderResponse:
        grader = await self._parse(tenant, request.grader, models)
        graders = Graders(GatewayJudge(self.settings, gateway, models, tenant), self.sandbox)
        sample, item = sample_from_text(request.model_sample), request.item or {}
        # Bounded: a python grader is a process of up to 2 GB for up to its time limit.
        result = await capacity.run_async(tenant.organization, graders.grade, grader, sample, item)
        return RunGraderResponse.of(result)

    async def _parse(self, tenant: Tenant, raw: dict[str, object], models: ModelService) -> Grader:
        try:
            grader = parse_grader(raw)
        except InvalidGrader as error:
            raise InvalidRequest(error.message, param=error.param) from None
        for param, model in _judge_models(grader):
            await run_in_threadpool(self._judge, tenant, models, param, model)
        return grader

    def _judge(
        self, tenant: Tenant, models: ModelService, param: str, model: str
    ) -> InferenceTarget:
        """What answers for a grader's `model` (FTAAS_GRADER_MODELS, OpenAI's names, or one
        of the caller's models); a 404 naming the field when the caller cannot use it."""
        local = local_judge_model(self.settings, model, next(iter(models.base_models)))
        try:
            return models.inference_target(tenant, local)
        except NotFound:
            mapped = f" (which `{model}` maps to)" if local != model else ""
            raise NotFound(
                f"The judge model `{local}`{mapped} does not exist or you do not have "
                "access to it.",
                param=param,
                code="model_not_found",
            ) from None
