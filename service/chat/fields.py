"""What a tenant's chat or completions request may ask of an engine shared with others.

Only OpenAI's request fields (read from the official SDK's own parameter types, so the list
follows OpenAI) and a few sampling extensions of vLLM that cost no more than OpenAI's own
pass; anything else is a 400 naming the field, as OpenAI answers an unrecognised argument.
The sizes a request multiplies work by have bounds: `n`, `best_of`, log-probabilities
and the number of completion prompts past theirs are a 400 naming the field, as OpenAI
answers a value above its maximum; output tokens are clamped to the configured limit.
The prefix cache is salted per organization, so no tenant can time another's prompts, and
a client's own `cache_salt` is refused. Media URLs are fetched only from allowed domains
(data: URLs always pass).
"""

from __future__ import annotations

import hashlib
from functools import cache
from typing import Any
from urllib.parse import urlsplit

from service.config import Settings
from service.errors import InvalidRequest

# vLLM sampling extensions that cost no more than OpenAI's fields do.
SAFE_EXTENSIONS = frozenset(
    {"top_k", "min_p", "repetition_penalty", "min_tokens", "skip_special_tokens"}
)
MAX_TOP_LOGPROBS = 20  # OpenAI's bounds
MAX_COMPLETION_LOGPROBS = 5
MEDIA_PARTS = {"image_url": "url", "video_url": "url", "audio_url": "url", "file_url": "url"}


@cache
def allowed_fields(kind: str) -> frozenset[str]:
    if kind == "chat":
        from openai.types.chat.completion_create_params import CompletionCreateParamsBase
    else:
        from openai.types.completion_create_params import (  # type: ignore[assignment]
            CompletionCreateParamsBase,
        )
    return frozenset(CompletionCreateParamsBase.__annotations__) | {"stream"} | SAFE_EXTENSIONS


def cache_salt(organization: str) -> str:
    return "ftaas-" + hashlib.sha256(organization.encode()).hexdigest()[:32]


def harden(
    kind: str, body: dict[str, Any], organization: str, settings: Settings
) -> dict[str, Any]:
    """The request as the engine may see it (a new dict), or a 400 naming the field."""
    if "cache_salt" in body:
        raise InvalidRequest(
            "cache_salt is set by the server for each organization", param="cache_salt"
        )
    unknown = sorted(set(body) - allowed_fields(kind))
    if unknown:
        raise InvalidRequest(
            f"Unrecognized request argument supplied: {unknown[0]}", param=unknown[0]
        )
    body = dict(body)
    _bound(body, "n", settings.max_choices)
    _bound(body, "best_of", settings.max_choices)
    for field in ("max_tokens", "max_completion_tokens"):
        _clamp(body, field, settings.max_output_tokens)
    if kind == "chat":
        _bound(body, "top_logprobs", MAX_TOP_LOGPROBS)
        _check_media(body.get("messages"), settings)
    else:
        _bound(body, "logprobs", MAX_COMPLETION_LOGPROBS)
        _bound_prompts(body.get("prompt"), settings.max_prompts)
    body["cache_salt"] = cache_salt(organization)
    return body


def _bound(body: dict[str, Any], field: str, limit: int) -> None:
    value = body.get(field)
    if isinstance(value, int) and not isinstance(value, bool) and value > limit:
        raise InvalidRequest(
            f"Invalid '{field}': integer above maximum value. Expected a value <= {limit}, "
            f"but got {value} instead.",
            param=field,
        )


def _bound_prompts(prompt: Any, limit: int) -> None:
    """Each prompt of a list is a generation of its own (times `n`): a list of token ids
    is one prompt, a list of strings or of token lists is one per item."""
    if not isinstance(prompt, list) or all(isinstance(item, int) for item in prompt):
        return
    if len(prompt) > limit:
        raise InvalidRequest(
            f"Invalid 'prompt': array too long. Expected an array with maximum length "
            f"{limit}, but got an array with length {len(prompt)} instead.",
            param="prompt",
        )


def _clamp(body: dict[str, Any], field: str, limit: int | None) -> None:
    value = body.get(field)
    if limit is not None and isinstance(value, int) and not isinstance(value, bool):
        body[field] = min(value, limit)


def _check_media(messages: Any, settings: Settings) -> None:
    allowed = set(settings.media_domains)
    if not isinstance(messages, list):
        return
    for index, message in enumerate(messages):
        content = message.get("content") if isinstance(message, dict) else None
        if not isinstance(content, list):
            continue
        for number, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") not in MEDIA_PARTS:
                continue
            kind = part["type"]
            media = part.get(kind)
            url = media.get(MEDIA_PARTS[kind]) if isinstance(media, dict) else media
            if not isinstance(url, str) or url.startswith("data:"):
                continue
            host = (urlsplit(url).hostname or "").lower()
            if host not in allowed:
                raise InvalidRequest(
                    f"Media from {host or 'that URL'} is not fetched by this server (send it "
                    "as a data: URL, or ask the operator to allow the domain)",
                    param=f"messages[{index}].content[{number}].{kind}",
                )


def tool_choice_for(body: dict[str, Any], can_choose_tools: bool) -> dict[str, Any]:
    """OpenAI's default with `tools` is `tool_choice: auto`; an engine with no tool-call
    parser for its model refuses it with a 400, so there the model answers in text, as
    `auto` allows (`required` and a named function pass: vLLM's guided decoding serves
    them without a parser)."""
    if can_choose_tools or not body.get("tools") or body.get("tool_choice", "auto") != "auto":
        return body
    return {**body, "tool_choice": "none"}
