"""A cap on request bodies, enforced while they stream in.

FastAPI parses a multipart body (spooling files to disk) before a route runs, so a route
cannot refuse an oversized upload in time. This ASGI middleware counts the bytes as they
arrive and answers 400 in OpenAI's envelope as soon as a body passes its limit: a
declared Content-Length over the limit is refused before anything is read.
"""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Callable
from typing import Any

from service.errors import envelope

Scope = dict[str, Any]
Message = dict[str, Any]
# Room for multipart headers and boundaries around the file itself.
MULTIPART_SLACK = 64 * 1024


class _TooLarge(Exception):
    pass


class BodyLimit:
    def __init__(self, app: Any, limits: list[tuple[str, Callable[[], int]]]):
        """`limits`: (path regex, function giving the limit in bytes) pairs."""
        self.app = app
        self.limits = [(re.compile(pattern), limit) for pattern, limit in limits]

    def _limit_for(self, scope: Scope) -> int | None:
        if scope["type"] != "http" or scope["method"] != "POST":
            return None
        for pattern, limit in self.limits:
            if pattern.fullmatch(scope["path"]):
                return limit() + MULTIPART_SLACK
        return None

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        limit = self._limit_for(scope)
        if limit is None:
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            return await _refuse(send, limit)

        received, exceeded, started = 0, False, False

        async def counting_receive() -> Message:
            nonlocal received, exceeded
            message = await receive()
            received += len(message.get("body", b""))
            if received > limit:
                exceeded = True
                raise _TooLarge
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal started
            if exceeded:
                return  # the app's answer to a cut-off body is replaced by ours
            started = True
            await send(message)

        with contextlib.suppress(_TooLarge):
            await self.app(scope, counting_receive, guarded_send)
        if exceeded and not started:
            await _refuse(send, limit)


async def _refuse(send: Any, limit: int) -> None:
    body = json.dumps(
        envelope(
            f"The request body is larger than the {limit - MULTIPART_SLACK} byte limit",
            "invalid_request_error",
            "file",
            "file_too_large",
        )
    ).encode()
    await send(
        {
            "type": "http.response.start",
            "status": 400,
            "headers": [(b"content-type", b"application/json"), (b"connection", b"close")],
        }
    )
    await send({"type": "http.response.body", "body": body})
