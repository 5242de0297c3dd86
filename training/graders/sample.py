"""The `sample` namespace: what a model answered, as graders read it."""

from __future__ import annotations

import json
from typing import Any


def sample_from_text(text: str, tool_calls: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """`output_text`, `output_json` (the text parsed, when it is JSON; else None),
    `output_tools` (chat completions' `tool_calls`), `choices` and `output_audio`."""
    try:
        output_json = json.loads(text)
    except (ValueError, RecursionError):
        output_json = None
    message: dict[str, Any] = {"role": "assistant", "content": text}
    if tool_calls:
        message["tool_calls"] = tool_calls
    return {
        "output_text": text,
        "output_json": output_json,
        "output_tools": list(tool_calls or []),
        "choices": [{"index": 0, "message": message, "finish_reason": "stop"}],
        "output_audio": None,
    }
