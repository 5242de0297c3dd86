"""The trainer's judge for score_model and label_model graders: a chat completion, shaped
by the grader's JSON schema, from the served model the API resolved for the job's
organization when the job was created (`TrainingSpec.judges`).

The trainer asks the model's Serve application directly (training/serving_client.py), by
its adapter's name for a tuned model, with vLLM's structured output. A judge that cannot
answer scores the sample 0 with `model_grader_server_error` (training/graders/judge.py).
"""

from __future__ import annotations

from typing import Any

from training.graders import JudgeReply, JudgeUnavailable
from training.serving_client import ServingClient, ServingFailed
from training.spec import JudgeTarget

# A judge's answer that takes longer is a model_grader_server_error.
JUDGE_TIMEOUT_S = 120.0
# The judge's answer length when the grader's sampling_params set none: its reasoning
# steps and the result.
DEFAULT_JUDGE_TOKENS = 512


class ServeJudge:
    def __init__(self, judges: dict[str, JudgeTarget]):
        self.judges = judges
        self.serving = ServingClient()

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
            answer = await self.serving.answer(
                "chat", target.base_model, body, adapter, JUDGE_TIMEOUT_S
            )
        except ServingFailed as failed:
            raise JudgeUnavailable(f"the judge model {failed}") from None
        reply = answer["choices"][0]["message"]
        usage = {k: v for k, v in (answer.get("usage") or {}).items() if isinstance(v, int)}
        return JudgeReply(reply.get("content") or "", served, usage, reply.get("refusal"))
