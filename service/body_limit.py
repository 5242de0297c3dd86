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
    def __init__(self, app: Any, limits: list[tuple[str, Callable[[], int], str | None]]):
        """`limits`: (path regex, function giving the limit in bytes, the multipart field
        of an upload or None for a JSON body); the first matching path applies."""
        self.app = app
        self.limits = [(re.compile(pattern), limit, field) for pattern, limit, field in limits]

    def _limit_for(self, scope: Scope) -> tuple[int, str | None] | None:
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT", "PATCH"):
            return None
        for pattern, limit, field in self.limits:
            if pattern.fullmatch(scope["path"]):
                return limit() + MULTIPART_SLACK, field
        return None

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        found = self._limit_for(scope)
        if found is None:
            return await self.app(scope, receive, send)
        limit, field = found
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            return await _refuse(send, limit, field)

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
            await _refuse(send, limit, field)


async def _refuse(send: Any, limit: int, field: str | None) -> None:
    """A file over its cap is a 400 naming the field (as before); a JSON body over its
    cap is a 413."""
    body = json.dumps(
        envelope(
            f"The request body is larger than the {limit - MULTIPART_SLACK} byte limit",
            "invalid_request_error",
            field,
            "file_too_large" if field else "request_too_large",
        )
    ).encode()
    await send(
        {
            "type": "http.response.start",
            "status": 400 if field else 413,
            "headers": [(b"content-type", b"application/json"), (b"connection", b"close")],
        }
    )
    await send({"type": "http.response.body", "body": body})
