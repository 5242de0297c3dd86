"""Domain errors carry their HTTP status; one place turns every error into OpenAI's envelope."""

from __future__ import annotations

from typing import Any, ClassVar

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException


class APIError(Exception):
    status_code = 400
    error_type = "invalid_request_error"
    headers: ClassVar[dict[str, str]] = {}

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code


class InvalidRequest(APIError):
    pass


class AuthenticationFailed(APIError):
    status_code = 401
    error_type = "invalid_request_error"


class NotFound(APIError):
    status_code = 404


class Conflict(APIError):
    """A permanent state conflict: tell the SDK not to retry (it retries 409 by default)."""

    status_code = 409
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


def _param_of(location: tuple[Any, ...]) -> str | None:
    parts = [str(p) for p in location if p not in ("body", "query", "path", "header")]
    return ".".join(parts) or None


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(_request: Request, error: APIError) -> JSONResponse:
        return error_response(
            error.status_code,
            error.message,
            error_type=error.error_type,
            param=error.param,
            code=error.code,
            headers=error.headers or None,
        )

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_request: Request, error: RequestValidationError) -> JSONResponse:
        first = error.errors()[0]
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
