"""Domain errors carry their HTTP status; one place turns every error into OpenAI's envelope."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from training.data.validation import UNION_BRANCH


class APIError(Exception):
    status_code = 400
    error_type = "invalid_request_error"
    headers: ClassVar[dict[str, str]] = {}

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code
        self.extra_headers = headers or {}


class InvalidRequest(APIError):
    pass


class AuthenticationFailed(APIError):
    status_code = 401
    error_type = "invalid_request_error"


class PermissionDenied(APIError):
    status_code = 403


class NotFound(APIError):
    status_code = 404


class Conflict(APIError):
    """A permanent state conflict: tell the SDK not to retry (it retries 409 by default)."""

    status_code = 409
    headers: ClassVar[dict[str, str]] = {"x-should-retry": "false"}


class RateLimited(APIError):
    """Too many requests for now: the SDK waits `retry-after` and tries again."""

    status_code = 429
    error_type = "requests"


class QuotaExceeded(APIError):
    """Over a standing limit (stored bytes, files, jobs): trying again will not help until
    something is deleted or finishes, so the SDK is told not to retry."""

    status_code = 429
    error_type = "insufficient_quota"
    headers: ClassVar[dict[str, str]] = {"x-should-retry": "false"}


class ServiceUnavailable(APIError):
    status_code = 503
    error_type = "server_error"


def envelope(message: str, error_type: str, param: str | None, code: str | None) -> dict[str, Any]:
    return {"error": {"message": message, "type": error_type, "param": param, "code": code}}


def error_response(
    status: int,
    message: str,
    *,
    error_type: str = "invalid_request_error",
    param: str | None = None,
    code: str | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    return JSONResponse(envelope(message, error_type, param, code), status, headers=headers)


_REQUEST_PARTS = frozenset({"body", "query", "path", "header"})


def _param_of(location: tuple[Any, ...]) -> str | None:
    parts = [
        f"[{p}]" if isinstance(p, int) else str(p)
        for p in location
        if p not in _REQUEST_PARTS and not (isinstance(p, str) and UNION_BRANCH.match(p))
    ]
    return ".".join(parts).replace(".[", "[") or None


def _most_telling(errors: Sequence[Any]) -> Any:
    """Of a union's errors, the one about the value's own branch: for `n_epochs: 0`,
    "greater than or equal to 1" rather than "should be 'auto'"."""
    for error in errors:
        if not any(isinstance(p, str) and p.startswith("literal[") for p in error.get("loc", ())):
            return error
    return errors[0]


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(_request: Request, error: APIError) -> JSONResponse:
        return error_response(
            error.status_code,
            error.message,
            error_type=error.error_type,
            param=error.param,
            code=error.code,
            headers={**error.headers, **error.extra_headers} or None,
        )

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_request: Request, error: RequestValidationError) -> JSONResponse:
        first = _most_telling(error.errors())
        if first.get("type") == "json_invalid":
            return error_response(
                400, "We could not parse the JSON body of your request. It must be valid JSON."
            )
        param = _param_of(tuple(first.get("loc", ())))
        message = first.get("msg", "invalid request")
        if param:
            message = f"{message}: '{param}'"
        return error_response(400, message, param=param)

    @app.exception_handler(HTTPException)
    async def _http_error(_request: Request, error: HTTPException) -> JSONResponse:
        error_type = "invalid_request_error" if error.status_code < 500 else "server_error"
        return error_response(error.status_code, str(error.detail), error_type=error_type)

    @app.exception_handler(Exception)
    async def _unexpected(_request: Request, _error: Exception) -> JSONResponse:
        return error_response(
            500, "The server had an error processing your request.", error_type="server_error"
        )
