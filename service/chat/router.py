"""/v1/chat/completions and /v1/completions: authorise the model, then let serving answer.

The request body is passed through as JSON: vLLM's own protocol models validate it, so
every field vLLM honours works and its errors come back in OpenAI's envelope.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool

from service.chat.fields import harden
from service.deps import GatewayDep, ModelsDep, TenantDep
from service.errors import InvalidRequest, envelope

logger = logging.getLogger(__name__)

router = APIRouter(prefix="/v1", tags=["inference"])


async def _json_body(request: Request) -> dict[str, Any]:
    # As FastAPI's JSON routes: a form or text/plain body (what a cross-site page can send
    # without asking) is not taken for JSON.
    media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media_type != "application/json" and not media_type.endswith("+json"):
        raise InvalidRequest(
            "The request body must be JSON, sent with Content-Type: application/json."
        )
    try:
        body = json.loads(await request.body())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise InvalidRequest("The request body is not valid JSON.") from None
    except RecursionError:
        raise InvalidRequest("The request body is nested too deeply.") from None
    if not isinstance(body, dict):
        raise InvalidRequest("The request body must be a JSON object.")
    if not isinstance(body.get("model"), str) or not body["model"]:
        raise InvalidRequest("you must provide a model parameter", param="model")
    return body


async def _answer(
    kind: str, request: Request, tenant: Any, models: Any, gateway: Any
) -> JSONResponse | StreamingResponse:
    body = harden(kind, await _json_body(request), tenant.organization, request.app.state.settings)
    # A database read: off the event loop, which serves every stream.
    target = await run_in_threadpool(models.inference_target, tenant, body["model"])
    # One of the organization's concurrent slots, held until the answer has been sent.
    release = request.app.state.limits.inference_slot(tenant.organization)
    try:
        head, rest = await gateway.respond(kind, target, body)
    except BaseException:
        release()
        raise
    if head["stream"]:
        return HeldStream(_errors_in_band(rest), release, rest)
    release()
    return JSONResponse(head["body"], status_code=head["status"])


class HeldStream(StreamingResponse):
    """A streamed answer that, however it ends (finished, failed, the client gone before or
    during the stream, the request task cancelled), gives the organization's slot back and
    stops the generation upstream (Serve cancels the replica's call, vLLM aborts it)."""

    def __init__(self, content: AsyncIterator[str], release: Callable[[], None], upstream: Any):
        super().__init__(content, media_type="text/event-stream")
        self.release, self.upstream = release, upstream

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.release()
            await _stop(self.upstream)


async def _stop(upstream: Any) -> None:
    try:
        if callable(getattr(upstream, "cancel", None)):  # a Serve response generator
            upstream.cancel()
        elif callable(getattr(upstream, "aclose", None)):
            await upstream.aclose()
    except Exception:  # already finished or gone: nothing left to stop
        logger.debug("stopping a finished stream", exc_info=True)


async def _errors_in_band(stream: AsyncIterator[str]) -> AsyncIterator[str]:
    """Once a stream has begun its status is sent: a later failure becomes an `error`
    event, as OpenAI sends it, instead of a connection cut mid-answer."""
    try:
        async for chunk in stream:
            yield chunk
    except Exception:
        logger.exception("a streamed answer failed mid-way")
        error = envelope(
            "The server had an error while streaming the answer.", "server_error", None, None
        )
        yield f"data: {json.dumps(error)}\n\n"
        yield "data: [DONE]\n\n"


@router.post("/chat/completions", response_model=None)
async def chat_completions(
    request: Request, tenant: TenantDep, models: ModelsDep, gateway: GatewayDep
) -> JSONResponse | StreamingResponse:
    return await _answer("chat", request, tenant, models, gateway)


@router.post("/completions", response_model=None)
async def completions(
    request: Request, tenant: TenantDep, models: ModelsDep, gateway: GatewayDep
) -> JSONResponse | StreamingResponse:
    return await _answer("completion", request, tenant, models, gateway)
