"""score_model and label_model: a model that ftaas serves judges the sample.

The grader renders its messages, asks a `Judge` for an answer shaped by a JSON schema
(structured output), and reads the result. The API's judge is the serving gateway
(service/graders/judge.py); the trainer asks Ray Serve directly (training/serve_judge.py).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from typing import Any, Protocol

from training.graders.result import GradeResult
from training.graders.schemas import (
    GraderMessage,
    InputAudio,
    InputImage,
    LabelModelGrader,
    ScoreModelGrader,
)
from training.graders.template import render

# The grader models OpenAI's guide lists (OpenAI-only): a server maps them to a model it
# serves (FTAAS_GRADER_MODELS; by default the first base model).
OPENAI_GRADER_MODEL = re.compile(r"^(gpt-|o\d)")


@dataclass
class JudgeReply:
    text: str  # the answer's content (JSON, as the schema asked)
    model: str  # the model that answered
    usage: dict[str, int] = field(default_factory=dict)  # prompt/completion/total tokens
    refusal: str | None = None


class JudgeUnavailable(RuntimeError):
    """The judge model could not answer (model_grader_server_error, with this message)."""


class Judge(Protocol):
    async def __call__(
        self,
        model: str,
        messages: list[dict[str, Any]],
        json_schema: dict[str, Any],
        sampling: dict[str, Any],
    ) -> JudgeReply:
        """The judge model's answer to `messages`, constrained to `json_schema`."""
        ...


# The judge's reasoning before its result, bounded (a few short steps) so that the answer
# ends, result included, within a few hundred tokens: a small judge left unbounded can spend
# its whole `max_completions_tokens` on steps, and a cut-off answer is a parse error.
MAX_STEPS, MAX_STEP_CHARS = 3, 160
_STEP_TEXT = {"type": "string", "maxLength": MAX_STEP_CHARS}
_STEPS = {
    "type": "array",
    "maxItems": MAX_STEPS,
    "items": {
        "type": "object",
        "properties": {"description": _STEP_TEXT, "conclusion": _STEP_TEXT},
        "required": ["description", "conclusion"],
        "additionalProperties": False,
    },
}


def score_schema() -> dict[str, Any]:
    """What OpenAI's guide says a score model is asked for: {"result": float, "steps"}."""
    return {
        "type": "object",
        "properties": {"steps": _STEPS, "result": {"type": "number"}},
        "required": ["steps", "result"],
        "additionalProperties": False,
    }


def label_schema(labels: list[str]) -> dict[str, Any]:
    return {
        "type": "object",
        "properties": {"steps": _STEPS, "result": {"type": "string", "enum": labels}},
        "required": ["steps", "result"],
        "additionalProperties": False,
    }


def _part(part: Any, item: dict[str, Any], sample: dict[str, Any]) -> dict[str, Any]:
    if isinstance(part, InputImage):
        return {"type": "image_url", "image_url": {"url": render(part.image_url, item, sample)}}
    if isinstance(part, InputAudio):
        return {"type": "input_audio", "input_audio": part.input_audio}
    return {"type": "text", "text": render(part.text, item, sample)}


def chat_messages(
    messages: list[GraderMessage], item: dict[str, Any], sample: dict[str, Any], instruction: str
) -> list[dict[str, Any]]:
    """The grader's messages as chat completions messages, templates filled (raises
    InvalidVariable), with the answer's shape said last."""
    out: list[dict[str, Any]] = []
    for message in messages:
        role = "system" if message.role == "developer" else message.role
        content = message.content
        if isinstance(content, str):
            out.append({"role": role, "content": render(content, item, sample)})
        else:
            parts = content if isinstance(content, list) else [content]
            out.append({"role": role, "content": [_part(p, item, sample) for p in parts]})
    return [*out, {"role": "system", "content": instruction}]


def sampling_of(grader: ScoreModelGrader | LabelModelGrader) -> dict[str, Any]:
    """Chat completions' sampling fields (reasoning_effort has no equivalent: ignored)."""
    params = getattr(grader, "sampling_params", None)
    if params is None:
        return {"temperature": 0.0}
    sampling = {
        "temperature": params.temperature if params.temperature is not None else 0.0,
        "top_p": params.top_p,
        "seed": params.seed,
        "max_tokens": params.max_completions_tokens,
    }
    return {key: value for key, value in sampling.items() if value is not None}


async def judge_grade(
    grader: ScoreModelGrader | LabelModelGrader,
    item: dict[str, Any],
    sample: dict[str, Any],
    judge: Judge,
    result: GradeResult,
) -> None:
    """Fill `result` (reward, flags, usage) from the judge's answer. Raises
    InvalidVariable for a template that does not resolve."""
    if isinstance(grader, ScoreModelGrader):
        low, high = grader.bounds
        schema = score_schema()
        instruction = (
            'Answer with a JSON object {"steps": [{"description": ..., "conclusion": ...}], '
            f'"result": <a number from {low:g} to {high:g}>}}.'
        )
    else:
        schema = label_schema(grader.labels)
        instruction = (
            'Answer with a JSON object {"steps": [{"description": ..., "conclusion": ...}], '
            f'"result": <one of {json.dumps(grader.labels)}>}}.'
        )
    messages = chat_messages(grader.input, item, sample, instruction)
    try:
        reply = await judge(grader.model, messages, schema, sampling_of(grader))
    except Exception as error:  # JudgeUnavailable, or any judge's own failure
        details = str(error) if isinstance(error, JudgeUnavailable) else repr(error)
        result.failed(model_grader_server_error=True, model_grader_server_error_details=details)
        return
    result.sampled_model_name = reply.model
    result.add_usage(reply.model, reply.usage)
    if reply.refusal:
        result.failed(model_grader_refusal_error=True)
        return
    try:
        answer = json.loads(reply.text)["result"]
    except (ValueError, TypeError, KeyError, RecursionError):
        result.failed(model_grader_parse_error=True)
        return
    if isinstance(grader, ScoreModelGrader):
        valid = isinstance(answer, int | float) and not isinstance(answer, bool)
        if not valid or not math.isfinite(answer):
            result.failed(model_grader_parse_error=True)
            return
        result.reward = min(max(float(answer), low), high)
        return
    if answer not in grader.labels:
        result.failed(model_grader_parse_error=True)
        return
    result.reward = float(answer in grader.passing_labels)
