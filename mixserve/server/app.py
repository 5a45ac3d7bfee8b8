"""The FastAPI app: OpenAI routes, /health, /metrics, /tokenize, /detokenize over one `ServerState`."""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from fastapi import FastAPI, Request
from fastapi.responses import Response
from pydantic import ValidationError

from mixserve.server.chat import create_chat_completion
from mixserve.server.completions import create_completion
from mixserve.server.errors import ApiError, as_api_error, error_response, install_error_handlers
from mixserve.server.guards import decode_json, field_name, header_value, offload, read_body
from mixserve.server.openapi import install_openapi
from mixserve.server.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    TokenizeRequest,
    _Body,
)
from mixserve.server.serving import RunStreamingResponse, ServerState
from mixserve.server.tokenization import detokenize, tokenize, tokenizer_info

log = logging.getLogger("mixserve.server")
B = TypeVar("B", bound=_Body)


async def parse_body(request: Request, model: type[B], state: ServerState) -> B:
    """JSON body -> `model` under `state.request_limits`; errors name the field; unknown fields are ignored
    (logged, reported in a header) or rejected. Parsing and validation run off the event loop."""
    raw = await read_body(request, state.request_limits)
    body = await offload(_decode, raw, model, state)
    if body.unknown_fields:
        if state.reject_unknown_fields:
            name = field_name((body.unknown_fields[0],))
            raise ApiError(400, f"unknown field {name} (this server rejects unknown fields)", param=name)
        log.info("ignoring unknown fields %s", [field_name((n,)) for n in body.unknown_fields])
    return body


def _decode(raw: bytes, model: type[B], state: ServerState) -> B:
    data = decode_json(raw, state.request_limits)
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise _validation_error(exc) from exc


def _validation_error(exc: ValidationError) -> ApiError:
    first = exc.errors()[0]
    parts = [str(p) for p in first["loc"]]
    # drop pydantic's union-branch markers (`str`, `list[int]`, ...) from the field path
    parts = [p for p in parts if not (p in ("str", "int", "float", "bool") or "[" in p)]
    name = field_name(tuple(parts))
    if first["type"] == "missing":
        return ApiError(400, f"missing required field {name}", param=name)
    shown = json.dumps(first.get("input"), default=str)[:80]
    return ApiError(400, f"invalid field {name}: {first['msg']} (got {shown})", param=name)


async def _route(state: ServerState, body: Any) -> tuple[ServerState, Callable[[], None]]:
    """The state that serves `body.model` (pinned until `release()` on a multi-model server)."""
    if state.router is None:
        _check_model(state, body)
        return state, lambda: None
    return await state.router.route(getattr(body, "model", None))  # type: ignore[no-any-return]


def _release_after(response: Any, release: Callable[[], None]) -> None:
    """Release now, or when a streamed response ends."""
    if isinstance(response, RunStreamingResponse):
        response.on_close.append(release)
    else:
        release()


def _check_model(state: ServerState, body: Any) -> None:
    name = getattr(body, "model", None)
    if name is not None and name not in (state.model_name, state.model_path):
        raise ApiError(404, f"the model {name!r} does not exist; this server serves {state.model_name!r}",
                       param="model", code="model_not_found")


def build_app(state: ServerState, lifespan: Any = None) -> FastAPI:
    """The app; `lifespan` (an async context manager factory) loads and stops the engine."""
    app = FastAPI(title="mixserve", version="0.1.0", lifespan=lifespan)
    app.state.mixserve = state
    install_error_handlers(app)
    install_openapi(app)

    async def guarded(run: Callable[[], Awaitable[Any]]) -> Any:
        try:
            return await run()
        except Exception as exc:  # noqa: BLE001 - every failure becomes an OpenAI-shaped error
            err = as_api_error(exc)
            if state.metrics is not None:
                state.metrics.error(err.status)
            if err.status == 499:
                log.info("client went away (499): %s", err.message)
            elif err.status >= 500 and err.status != 503:
                log.exception("request failed")
            return error_response(err)

    async def openai_route(request: Request, model: type[B],
                           handler: Callable[[ServerState, B, Request], Awaitable[Any]]) -> Any:
        async def run() -> Any:
            body = await parse_body(request, model, state)
            target, release = await _route(state, body)
            try:
                response = await handler(target, body, request)
            except BaseException:
                release()
                raise
            _release_after(response, release)
            if body.unknown_fields and isinstance(response, Response):
                response.headers["x-mixserve-ignored-fields"] = header_value(body.unknown_fields)
            return response
        return await guarded(run)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Any:
        return await openai_route(request, CompletionRequest, create_completion)

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Any:
        return await openai_route(request, ChatCompletionRequest, create_chat_completion)

    @app.get("/v1/models")
    async def models() -> Any:
        if state.router is not None:
            return {"object": "list", "data": state.router.models(state.created)}
        max_len = state.limits.max_model_len if state.limits else None
        return {"object": "list", "data": [{
            "id": state.model_name, "object": "model", "created": state.created, "owned_by": "mixserve",
            "root": state.model_path or state.model_name, "parent": None, "max_model_len": max_len,
            "status": "ready" if state.engine is not None else "loading"}]}

    @app.get("/health")
    async def health() -> Any:
        async def run() -> Any:
            if state.router is None:
                state.ready()
            return {"status": "ok"}
        return await guarded(run)

    @app.get("/version")
    async def version() -> Any:
        return {"version": app.version}

    @app.get("/metrics")
    async def metrics() -> Response:
        if state.render_metrics is not None:
            return Response(state.render_metrics(), media_type="text/plain; version=0.0.4")
        if state.metrics is None:
            return Response(b"", media_type="text/plain")
        return Response(state.metrics.render(), media_type="text/plain; version=0.0.4")

    @app.post("/tokenize")
    async def tokenize_route(request: Request) -> Any:
        async def run() -> Any:
            body = await parse_body(request, TokenizeRequest, state)
            target, release = await _route(state, body)
            try:
                return await big_json(await tokenize(target, body))
            finally:
                release()
        return await guarded(run)

    @app.post("/detokenize")
    async def detokenize_route(request: Request) -> Any:
        async def run() -> Any:
            body = await parse_body(request, DetokenizeRequest, state)
            target, release = await _route(state, body)
            try:
                return await big_json(await detokenize(target, body))
            finally:
                release()
        return await guarded(run)

    async def manage(request: Request, action: str) -> Any:
        async def run() -> Any:
            if state.router is None:
                raise ApiError(404, "this server serves one model; start it with several to load/unload models")
            raw = await read_body(request, state.request_limits)
            data = decode_json(raw, state.request_limits) if raw else {}
            name = data.get("model") if isinstance(data, dict) else None
            if not isinstance(name, str):
                raise ApiError(400, "missing required field model", param="model")
            return await (state.router.load(name) if action == "load" else state.router.unload(name))
        return await guarded(run)

    @app.post("/v1/models/load")
    async def load_model_route(request: Request) -> Any:
        return await manage(request, "load")

    @app.post("/v1/models/unload")
    async def unload_model_route(request: Request) -> Any:
        return await manage(request, "unload")

    @app.get("/tokenizer_info")
    async def tokenizer_info_route(request: Request) -> Any:
        async def run() -> Any:
            if state.router is None:
                return tokenizer_info(state)
            target, release = await state.router.route(request.query_params.get("model"))
            try:
                return tokenizer_info(target)
            finally:
                release()
        return await guarded(run)

    return app


async def big_json(payload: dict[str, Any]) -> Response:
    """A JSON response rendered off the event loop (token lists can be millions long)."""
    text = await offload(json.dumps, payload, ensure_ascii=False, separators=(",", ":"))
    return Response(text.encode("utf-8"), media_type="application/json")
