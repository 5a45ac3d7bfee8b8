"""`/openapi.json` built from the pydantic request models (`protocol`) and response models (`schemas`).

The routes parse their bodies themselves (size/depth/Unicode guards first, then the same pydantic
model), so FastAPI cannot see them; this table says which model each route reads and writes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from mixserve.server import schemas
from mixserve.server.protocol import ChatCompletionRequest, CompletionRequest, DetokenizeRequest, TokenizeRequest

REF = "#/components/schemas/{model}"
_BODY_ERRORS = {400: "Invalid request (the error names the field)", 404: "Unknown model",
                408: "The body did not arrive in time", 413: "Request body too large",
                503: "The model is loading or the engine is down"}
_GET_ERRORS = {503: "The model is loading or the engine is down"}


@dataclass(frozen=True)
class RouteDoc:
    path: str
    method: str
    summary: str
    response: type[BaseModel] | None
    request: type[BaseModel] | None = None
    streams: bool = False
    errors: tuple[int, ...] = ()
    text: bool = False


ROUTES = (
    RouteDoc("/v1/completions", "post", "Text completions (OpenAI); `stream: true` answers server-sent events",
             schemas.CompletionResponse, CompletionRequest, streams=True, errors=(*_BODY_ERRORS, 429)),
    RouteDoc("/v1/chat/completions", "post", "Chat completions (OpenAI); `stream: true` answers server-sent events",
             schemas.ChatCompletionResponse, ChatCompletionRequest, streams=True, errors=(*_BODY_ERRORS, 429)),
    RouteDoc("/v1/models", "get", "The served model", schemas.ModelList),
    RouteDoc("/health", "get", "200 once the model is loaded and the engine runs", schemas.Health,
             errors=tuple(_GET_ERRORS)),
    RouteDoc("/version", "get", "Server version", schemas.Version),
    RouteDoc("/metrics", "get", "Prometheus metrics", None, text=True),
    RouteDoc("/tokenize", "post", "Text or chat messages -> token ids (vLLM)", schemas.TokenizeResponse,
             TokenizeRequest, errors=tuple(_BODY_ERRORS)),
    RouteDoc("/detokenize", "post", "Token ids -> text (vLLM)", schemas.DetokenizeResponse, DetokenizeRequest,
             errors=tuple(_BODY_ERRORS)),
    RouteDoc("/tokenizer_info", "get", "The tokenizer's configuration (vLLM; lm-eval's remote tokenizer)",
             schemas.TokenizerInfo, errors=tuple(_GET_ERRORS)),
)


def openapi_schema(app: FastAPI) -> dict[str, Any]:
    """The OpenAPI 3.1 document of `ROUTES`; components are every model's JSON schema."""
    inputs = [r.request for r in ROUTES if r.request is not None]
    outputs = [r.response for r in ROUTES if r.response is not None] + [schemas.ErrorResponse]
    _, defs = models_json_schema([(m, "validation") for m in inputs] + [(m, "serialization") for m in outputs],
                                 ref_template=REF)
    paths: dict[str, dict[str, Any]] = {}
    for route in ROUTES:
        paths.setdefault(route.path, {})[route.method] = _operation(route)
    return {"openapi": "3.1.0", "info": {"title": app.title, "version": app.version,
                                         "description": app.description or "mixserve's OpenAI-compatible server"},
            "paths": paths, "components": {"schemas": defs.get("$defs", {})}}


def _ref(model: type[BaseModel]) -> dict[str, str]:
    return {"$ref": REF.format(model=model.__name__)}


def _operation(route: RouteDoc) -> dict[str, Any]:
    content: dict[str, Any]
    if route.text:
        content = {"text/plain": {"schema": {"type": "string"}}}
    else:
        assert route.response is not None
        content = {"application/json": {"schema": _ref(route.response)}}
    if route.streams:
        # no schema: each event is `data: {chunk JSON}`, then `data: [DONE]`, which one JSON schema can't say
        content["text/event-stream"] = {}
    description = ("OK; with `stream: true`, server-sent events: `data: {chunk}` frames, then `data: [DONE]` "
                   "(an error after the stream began is an error frame)") if route.streams else "OK"
    responses: dict[str, Any] = {"200": {"description": description, "content": content}}
    for status in route.errors:
        description = {**_BODY_ERRORS, 429: "Queue full; retry after the Retry-After header"}.get(status, "Error")
        responses[str(status)] = {"description": description,
                                  "content": {"application/json": {"schema": _ref(schemas.ErrorResponse)}}}
    op: dict[str, Any] = {"summary": route.summary, "operationId": _operation_id(route), "responses": responses}
    if route.request is not None:
        op["requestBody"] = {"required": True, "content": {"application/json": {"schema": _ref(route.request)}}}
    return op


def _operation_id(route: RouteDoc) -> str:
    return route.method + route.path.replace("/", "_").replace(".", "_")


def install_openapi(app: FastAPI) -> None:
    """Serve `openapi_schema(app)` at /openapi.json (computed once)."""
    cache: dict[str, Any] = {}

    def openapi() -> dict[str, Any]:
        if not cache:
            cache.update(openapi_schema(app))
        return cache

    app.openapi = openapi  # type: ignore[method-assign]
