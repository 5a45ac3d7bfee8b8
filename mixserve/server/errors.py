"""Errors in the OpenAI shape: `{"error": {"message", "type", "param", "code"}}` with a standard status."""

from __future__ import annotations

import json
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from mixserve.config import ConfigError
from mixserve.engine.async_engine import EngineDeadError
from mixserve.engine.engine import QueueFullError, RequestError
from mixserve.sampling_params import SamplingError

_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
          405: "invalid_request_error", 408: "timeout_error", 413: "invalid_request_error",
          429: "rate_limit_error", 499: "client_closed_request",
          500: "server_error", 503: "unavailable_error"}


class ApiError(Exception):
    """An error answered to the client as-is."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": _TYPES.get(status, "invalid_request_error"),
                      "param": param, "code": code}}


def error_response(err: ApiError) -> JSONResponse:
    headers = {"Retry-After": "1"} if err.status in (429, 503) else None
    return JSONResponse(error_body(err.status, err.message, err.param, err.code), status_code=err.status,
                        headers=headers)


def error_frame(err: ApiError) -> str:
    """The SSE frame for an error after the stream has started (the status was already 200)."""
    return f"data: {json.dumps(error_body(err.status, err.message, err.param, err.code))}\n\n"


def as_api_error(exc: BaseException) -> ApiError:
    """Map engine/sampling exceptions to an ApiError; anything unexpected is a 500 naming its type."""
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, ClientDisconnect):
        return ApiError(499, "client disconnected", code="client_disconnected")
    if isinstance(exc, SamplingError | ConfigError):
        # A nested config field (experts.policy) is no request parameter.
        return ApiError(400, str(exc), param=exc.field if exc.field and exc.field.isidentifier() else None)
    if isinstance(exc, RequestError):
        param = "prompt" if "prompt" in str(exc) else None
        return ApiError(400, str(exc), param=param)
    if isinstance(exc, QueueFullError):
        return ApiError(429, f"server overloaded: {exc}; retry later", code="queue_full")
    if isinstance(exc, EngineDeadError):
        return ApiError(503, str(exc), code="engine_unavailable")
    return ApiError(500, f"internal error: {type(exc).__name__}: {exc}")


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api(_: Request, exc: ApiError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return error_response(ApiError(exc.status_code, str(exc.detail)))

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        return error_response(as_api_error(exc))
