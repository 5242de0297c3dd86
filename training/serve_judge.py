"""The trainer's judge for score_model and label_model graders: a chat completion, shaped
by the grader's JSON schema, from the served model the API resolved for the job's
organization when the job was created (`TrainingSpec.judges`).

The trainer runs on the same Ray cluster as serving, so it asks the model's Serve
application directly, as the API's gateway does (service/chat/gateway.py), by its
adapter's name for a tuned model: no API key, no HTTP hop, and the same replicas, adapter
registration and structured output (vLLM's) as any chat request. A judge that cannot
answer scores the sample 0 with `model_grader_server_error` (training/graders/judge.py).
"""

from __future__ import annotations

import asyncio
from typing import Any

from serving.names import app_name
from training.graders import JudgeReply, JudgeUnavailable
from training.spec import JudgeTarget

# A judge's answer that takes longer is a model_grader_server_error.
JUDGE_TIMEOUT_S = 120.0
# The judge's answer length when the grader's sampling_params set none: its reasoning
# steps and the result.
DEFAULT_JUDGE_TOKENS = 512


class ServeJudge:
    def __init__(self, judges: dict[str, JudgeTarget]):
        self.judges = judges
        self._handles: dict[str, Any] = {}

    def _handle(self, base_model: str) -> Any:
        handle = self._handles.get(base_model)
        if handle is None:
            from ray import serve

            handle = self._handles[base_model] = serve.get_app_handle(app_name(base_model))
        return handle

    async def __call__(
        self,
        model: str,
        messages: list[dict[str, Any]],
        json_schema: dict[str, Any],
        sampling: dict[str, Any],
    ) -> JudgeReply:
        target = self.judges.get(model)
        if target is None:  # the API resolves every judge of the grader it accepts
            raise JudgeUnavailable(f"no judge was resolved for `{model}` when the job was made")
        served = target.adapter_name or target.base_model
        sampling = dict(sampling)
        max_tokens = sampling.pop("max_tokens", None) or DEFAULT_JUDGE_TOKENS
        body = {
            "model": served,
            "messages": messages,
            "response_format": {
                "type": "json_schema",
                "json_schema": {"name": "grader_result", "strict": True, "schema": json_schema},
            },
            "max_tokens": max_tokens,
            **sampling,
        }
        adapter = (target.adapter_name, target.adapter_key) if target.adapter_name else None
        try:
            handle = (await asyncio.to_thread(self._handle, target.base_model)).options(
                stream=True, multiplexed_model_id=target.adapter_name or ""
            )
            replies = handle.respond.remote("chat", body, adapter)
            head = await asyncio.wait_for(replies.__anext__(), JUDGE_TIMEOUT_S)
        except TimeoutError:
            raise JudgeUnavailable(
                f"the judge model `{served}` did not answer in {JUDGE_TIMEOUT_S:g} s"
            ) from None
        except Exception as error:  # serving's own failure (Ray), said in the flags
            raise JudgeUnavailable(f"the judge model `{served}`: serving failed: {error}") from None
        answer = head.get("body") or {}
        if head.get("status") != 200:
            message = (answer.get("error") or {}).get("message", f"status {head.get('status')}")
            raise JudgeUnavailable(f"the judge model `{served}` answered an error: {message}")
        reply = answer["choices"][0]["message"]
        usage = {k: v for k, v in (answer.get("usage") or {}).items() if isinstance(v, int)}
        return JudgeReply(reply.get("content") or "", served, usage, reply.get("refusal"))
