"""The API's judge for score_model and label_model graders: a chat completion, with a
JSON schema as response_format, from a model this server serves, through the serving
gateway as any chat request."""

from __future__ import annotations

import asyncio
from typing import Any

from starlette.concurrency import run_in_threadpool

from service.auth import Tenant
from service.chat.fields import harden
from service.chat.gateway import READY, ServingGateway
from service.config import Settings
from service.errors import APIError
from service.models.service import ModelService
from training.graders import JudgeReply, JudgeUnavailable
from training.graders.judge import OPENAI_GRADER_MODEL

# A judge's answer that takes longer is a model_grader_server_error.
JUDGE_TIMEOUT_S = 120.0


def local_judge_model(settings: Settings, model: str, first_base_model: str) -> str:
    """The model that judges for the grader's `model`: FTAAS_GRADER_MODELS's entry, else
    the first base model for an OpenAI grader model name (gpt-*, o1, o3...), else the
    name itself (a base model or a tuned `ft:` model of the caller's)."""
    if model in settings.grader_models:
        return settings.grader_models[model]
    if OPENAI_GRADER_MODEL.match(model):
        return first_base_model
    return model


class GatewayJudge:
    def __init__(
        self, settings: Settings, gateway: ServingGateway, models: ModelService, tenant: Tenant
    ):
        self.settings, self.gateway, self.models, self.tenant = settings, gateway, models, tenant

    async def __call__(
        self,
        model: str,
        messages: list[dict[str, Any]],
        json_schema: dict[str, Any],
        sampling: dict[str, Any],
    ) -> JudgeReply:
        local = local_judge_model(self.settings, model, next(iter(self.models.base_models)))
        named = f"the judge model `{local}`" + (f" (for `{model}`)" if local != model else "")
        body = {
            "model": local,
            "messages": messages,
            "response_format": {
                "type": "json_schema",
                "json_schema": {"name": "grader_result", "strict": True, "schema": json_schema},
            },
            **sampling,
        }
        try:
            # Your own models only (another organization's `ft:` name is not found).
            target = await run_in_threadpool(self.models.inference_target, self.tenant, local)
            if not self.settings.serving_enabled:
                raise JudgeUnavailable(
                    f"{named} cannot answer: serving is disabled on this server "
                    "(FTAAS_SERVING_ENABLED=false)"
                )
            state = self.gateway.state(target.base_model)
            if state != READY:
                raise JudgeUnavailable(f"{named} is not ready: {state}")
            body = harden("chat", body, self.tenant.organization, self.settings)
            head, _ = await asyncio.wait_for(
                self.gateway.respond("chat", target, body), JUDGE_TIMEOUT_S
            )
        except APIError as error:
            raise JudgeUnavailable(f"{named}: {error.message}") from None
        except TimeoutError:
            raise JudgeUnavailable(f"{named} did not answer in {JUDGE_TIMEOUT_S:g} s") from None
        except JudgeUnavailable:
            raise
        except Exception as error:  # serving's own failure (Ray), said in the flags
            raise JudgeUnavailable(f"{named}: serving failed: {error}") from None
        answer = head.get("body") or {}
        if head.get("status") != 200:
            message = (answer.get("error") or {}).get("message", f"status {head.get('status')}")
            raise JudgeUnavailable(f"{named} answered an error: {message}")
        reply = answer["choices"][0]["message"]
        usage = {k: v for k, v in (answer.get("usage") or {}).items() if isinstance(v, int)}
        return JudgeReply(reply.get("content") or "", local, usage, reply.get("refusal"))
