"""/v1/chat/completions and /v1/completions: authorise the model, then let serving answer.

The request body is passed through as JSON: vLLM's own protocol models validate it, so
every field vLLM honours works and its errors come back in OpenAI's envelope.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool

from service.chat.fields import harden, tool_choice_for
from service.deps import GatewayDep, ModelsDep, TenantDep
from service.errors import APIError, InvalidRequest, envelope
from service.metrics import CLIENT_CLOSED, ServerMetrics

logger = logging.getLogger(__name__)

router = APIRouter(prefix="/v1", tags=["inference"])
T = TypeVar("T")


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


async def _answer(kind: str, request: Request, tenant: Any, models: Any, gateway: Any) -> Response:
    body = harden(kind, await _json_body(request), tenant.organization, request.app.state.settings)
    # A database read: off the event loop, which serves every stream.
    target = await run_in_threadpool(models.inference_target, tenant, body["model"])
    if kind == "chat":
        base = models.base_models.get(target.base_model)
        body = tool_choice_for(body, base is not None and base.tool_call_parser is not None)
    # One of the organization's concurrent slots, held until the answer has been sent.
    release = request.app.state.limits.inference_slot(tenant.organization)
    record = AnswerRecord(request.app.state.metrics, kind, target.base_model, body["model"])
    try:
        head, rest = await _unless_client_leaves(request, gateway.respond(kind, target, body))
    except ClientLeft:
        release()
        record.finish(CLIENT_CLOSED)
        return Response(status_code=CLIENT_CLOSED)  # nobody reads it
    except BaseException as error:
        release()
        record.failed(error)
        raise
    if head["stream"]:
        return HeldStream(_errors_in_band(rest, record), release, rest, record)
    release()
    record.finish(head["status"], head.get("body"), head.get("stats"))
    return JSONResponse(head["body"], status_code=head["status"])


class ClientLeft(Exception):
    """The client closed its connection before its answer was ready."""


async def _unless_client_leaves(request: Request, call: Awaitable[T]) -> T:
    """`call`'s result, or ClientLeft, with `call` cancelled (the gateway then cancels the
    replica's call and vLLM aborts the generation), if the client hangs up first."""
    answer = asyncio.ensure_future(call)
    left = asyncio.ensure_future(_client_left(request))
    try:
        await asyncio.wait({answer, left}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        left.cancel()
        if not answer.done():
            answer.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        return await answer
    raise ClientLeft


async def _client_left(request: Request) -> None:
    # The body has been read: the next message the server sends is the disconnect.
    while (await request.receive())["type"] != "http.disconnect":
        pass


class AnswerRecord:
    """One request's entry in /metrics: counted once, however it ends."""

    def __init__(self, metrics: ServerMetrics, kind: str, base_model: str, model: str):
        self.metrics, self.kind, self.labels = metrics, kind, (base_model, model)
        self.started = time.perf_counter()
        self.done = False
        metrics.in_flight.labels(base_model).inc()

    def finish(
        self,
        status: int,
        body: dict[str, Any] | None = None,
        stats: dict[str, Any] | None = None,
        error_type: str | None = None,
    ) -> None:
        if self.done:
            return
        self.done = True
        base_model, model = self.labels
        self.metrics.in_flight.labels(base_model).dec()
        self.metrics.requests.labels(base_model, model, self.kind, str(status)).inc()
        duration = time.perf_counter() - self.started
        self.metrics.request_duration.labels(base_model, model).observe(duration)
        if (status >= 400 and status != CLIENT_CLOSED) or error_type is not None:
            error = (body or {}).get("error") or {}
            self.metrics.errors.labels(base_model, model, error_type or error.get("type")).inc()
        if stats is not None:
            self.metrics.observe_answer(base_model, model, stats)

    def failed(self, error: BaseException) -> None:
        if isinstance(error, APIError):
            if error.code == "engine_overloaded":
                self.metrics.rejected.labels(self.labels[0]).inc()
            self.finish(error.status_code, error_type=error.error_type)
        elif isinstance(error, asyncio.CancelledError):
            self.finish(CLIENT_CLOSED)
        else:
            self.finish(500, error_type="server_error")


class HeldStream(StreamingResponse):
    """A streamed answer that, however it ends (finished, failed, the client gone before or
    during the stream, the request task cancelled), gives the organization's slot back,
    stops the generation upstream (Serve cancels the replica's call, vLLM aborts it) and
    is counted."""

    def __init__(
        self,
        content: AsyncIterator[str],
        release: Callable[[], None],
        upstream: Any,
        record: AnswerRecord,
    ):
        super().__init__(content, media_type="text/event-stream")
        self.release, self.upstream, self.record = release, upstream, record

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.release()
            self.record.finish(CLIENT_CLOSED)  # unless the stream was counted already
            await _stop(self.upstream)


async def _stop(upstream: Any) -> None:
    try:
        if callable(getattr(upstream, "cancel", None)):  # a Serve response generator
            upstream.cancel()
        elif callable(getattr(upstream, "aclose", None)):
            await upstream.aclose()
    except Exception:  # already finished or gone: nothing left to stop
        logger.debug("stopping a finished stream", exc_info=True)


async def _errors_in_band(stream: AsyncIterator[Any], record: AnswerRecord) -> AsyncIterator[str]:
    """Once a stream has begun its status is sent: a later failure becomes an `error`
    event, as OpenAI sends it, instead of a connection cut mid-answer. The replica's last
    item, its measurements, is recorded and not sent."""
    stats, last = None, None
    try:
        async for chunk in stream:
            if isinstance(chunk, dict):
                stats = chunk.get("stats")
            elif chunk.startswith("data: [DONE]"):
                # Held until the replica's measurements are in: a client that hangs up on
                # reading it must not cut them off.
                last = chunk
            else:
                yield chunk
    except Exception:
        logger.exception("a streamed answer failed mid-way")
        record.finish(200, error_type="server_error")
        error = envelope(
            "The server had an error while streaming the answer.", "server_error", None, None
        )
        yield f"data: {json.dumps(error)}\n\n"
        yield "data: [DONE]\n\n"
        return
    record.finish(200, stats=stats)
    if last is not None:
        yield last


@router.post("/chat/completions", response_model=None)
async def chat_completions(
    request: Request, tenant: TenantDep, models: ModelsDep, gateway: GatewayDep
) -> Response:
    return await _answer("chat", request, tenant, models, gateway)


@router.post("/completions", response_model=None)
async def completions(
    request: Request, tenant: TenantDep, models: ModelsDep, gateway: GatewayDep
) -> Response:
    return await _answer("completion", request, tenant, models, gateway)
