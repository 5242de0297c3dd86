"""A stream that fails after it began ends with an in-band `error` event the SDK raises.

Serving is replaced here by a gateway whose stream breaks after one chunk: the failure
this guards against (a replica dying mid-answer) cannot be caused on demand with the
real engine. The real engine's streams are covered in tests/e2e."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import pytest
from openai import APIError, OpenAI

CHUNK = {
    "id": "chatcmpl-1",
    "object": "chat.completion.chunk",
    "created": 0,
    "model": "ftaas-tiny",
    "choices": [{"index": 0, "delta": {"role": "assistant", "content": "Hel"}}],
}


class BreakingGateway:
    async def respond(self, kind, target, body):  # type: ignore[no-untyped-def]
        async def rest() -> AsyncIterator[str]:
            yield f"data: {json.dumps(CHUNK)}\n\n"
            raise RuntimeError("the replica died")

        return {"status": 200, "stream": True}, rest()


def test_a_failure_mid_stream_arrives_as_an_error_event(client, sdk: OpenAI):
    client.app.state.gateway = BreakingGateway()
    stream = sdk.chat.completions.create(
        model="ftaas-tiny", messages=[{"role": "user", "content": "hi"}], stream=True
    )
    received = []
    with pytest.raises(APIError, match="error while streaming"):
        for chunk in stream:
            received.append(chunk.choices[0].delta.content)
    assert received == ["Hel"]
