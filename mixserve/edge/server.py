"""The edge's OpenAI-compatible HTTP API: /v1/completions, /v1/chat/completions (streamed or not),
/v1/models, /health and Prometheus /metrics.

A client sees a normal model; only `usage` tells it the model is split (`edge_tokens`, `cloud_tokens`,
`standalone_tokens`, `link_bytes_sent`, `link_bytes_received`). The edge is one device running one
sequence at a time (requests queue on a lock) and decodes greedily: a request asking for sampling
(temperature > 0), several choices, logprobs or stop strings is refused with a 400 naming the field.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict

from mixserve.edge.api import EdgeLLM


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str | None = None
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    temperature: float | None = None
    n: int | None = None
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    stop: str | list[str] | None = None
    logprobs: Any = None
    ignore_eos: bool = False


class CompletionRequest(_Request):
    prompt: str | list[int]


class ChatRequest(_Request):
    messages: list[dict[str, Any]]


def _error(status: int, message: str, param: str | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": "invalid_request_error", "param": param,
                                   "code": None}}, status_code=status)


def _refusal(body: _Request, max_len: int, num_prompt: int) -> JSONResponse | None:
    if body.temperature not in (None, 0, 0.0):
        return _error(400, "the split edge model decodes greedily: temperature must be 0 or absent", "temperature")
    if body.n not in (None, 1):
        return _error(400, "the split edge model returns one choice: n must be 1", "n")
    if body.stop or body.logprobs not in (None, False):
        return _error(400, "stop strings and logprobs are not supported by the split edge model",
                      "stop" if body.stop else "logprobs")
    if num_prompt + (body.max_completion_tokens or body.max_tokens or 16) > max_len:
        return _error(400, f"prompt of {num_prompt} tokens + max_tokens exceeds the edge's max_len={max_len}",
                      "max_tokens")
    return None


def build_edge_app(llm: EdgeLLM, model_name: str) -> FastAPI:
    """The FastAPI app over one `EdgeLLM`."""
    app = FastAPI(title="mixserve edge")
    lock = threading.Lock()
    created = int(time.time())

    def run(ids: list[int], body: _Request, on_token: Any = None) -> Any:
        with lock:
            return llm.generate(ids, body.max_completion_tokens or body.max_tokens or 16, body.ignore_eos,
                                on_token=on_token)

    def usage(num_prompt: int, out: Any) -> dict[str, Any]:
        n = len(out.result.token_ids)
        return {"prompt_tokens": num_prompt, "completion_tokens": n, "total_tokens": num_prompt + n,
                **out.result.usage}

    async def respond(ids: list[int], body: _Request, chat: bool) -> Any:
        refused = _refusal(body, llm.config.max_len, len(ids))
        if refused is not None:
            return refused
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        head = {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": int(time.time()),
                "model": model_name}
        if body.stream:
            return StreamingResponse(_stream(ids, body, chat, head), media_type="text/event-stream")
        out = await asyncio.to_thread(run, ids, body)
        choice: dict[str, Any] = {"index": 0, "finish_reason": out.result.finish_reason}
        if chat:
            choice["message"] = {"role": "assistant", "content": out.text}
        else:
            choice.update(text=out.text, logprobs=None)
        return {**head, "choices": [choice], "usage": usage(len(ids), out)}

    async def _stream(ids: list[int], body: _Request, chat: bool, head: dict[str, Any]) -> AsyncIterator[str]:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[str | None] = asyncio.Queue()
        detok = llm.tokenizer.detokenizer(ids)
        head = {**head, "object": "chat.completion.chunk" if chat else "text_completion"}

        def on_token(token: int, source: str) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, detok.push(token))

        task = asyncio.ensure_future(asyncio.to_thread(run, ids, body, on_token))
        task.add_done_callback(lambda _: queue.put_nowait(None))

        def chunk(text: str | None, finish: str | None) -> str:
            if chat:
                delta = {} if text is None else {"content": text}
                c: dict[str, Any] = {"index": 0, "delta": delta, "finish_reason": finish}
            else:
                c = {"index": 0, "text": text or "", "finish_reason": finish, "logprobs": None}
            return f"data: {json.dumps({**head, 'choices': [c]})}\n\n"

        if chat:
            yield f"data: {json.dumps({**head, 'choices': [{'index': 0, 'delta': {'role': 'assistant'}}]})}\n\n"
        while (text := await queue.get()) is not None:
            if text:
                yield chunk(text, None)
        out = await task
        tail = detok.flush()
        if tail:
            yield chunk(tail, None)
        yield chunk(None, out.result.finish_reason)
        if (body.stream_options or {}).get("include_usage"):
            yield f"data: {json.dumps({**head, 'choices': [], 'usage': usage(len(ids), out)})}\n\n"
        yield "data: [DONE]\n\n"

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest) -> Any:
        ids = body.prompt if isinstance(body.prompt, list) else llm.tokenizer.encode(body.prompt)
        return await respond(ids, body, chat=False)

    @app.post("/v1/chat/completions")
    async def chat(body: ChatRequest) -> Any:
        return await respond(llm.tokenizer.encode_chat(body.messages), body, chat=True)

    @app.get("/v1/models")
    async def models() -> Any:
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": created,
                                            "owned_by": "mixserve"}]}

    @app.get("/health")
    async def health() -> Any:
        return {"status": "ok", "cloud_connected": llm.runner.link.is_up}

    @app.get("/metrics")
    async def metrics() -> PlainTextResponse:
        return PlainTextResponse(metrics_text(llm))

    return app


def metrics_text(llm: EdgeLLM) -> str:
    """Prometheus text exposition of the edge's counters."""
    s, link = llm.stats, llm.runner.link
    lines = ["# TYPE mixserve_edge_tokens_total counter"]
    for source, value in (("edge", s.num_exit), ("cloud", s.num_cloud), ("standalone", s.num_standalone)):
        lines.append(f'mixserve_edge_tokens_total{{source="{source}"}} {value}')
    series: list[tuple[str, float, str]] = [
        ("mixserve_edge_exit_rate", s.exit_rate, "gauge"),
        ("mixserve_edge_link_bytes_sent_total", link.bytes_sent, "counter"),
        ("mixserve_edge_link_bytes_received_total", link.bytes_received, "counter"),
        ("mixserve_edge_cloud_wait_seconds_total", s.cloud_wait_s, "counter"),
        ("mixserve_edge_standalone_fallbacks_total", s.num_standalone, "counter"),
        ("mixserve_edge_reconnects_total", link.num_reconnects, "counter"),
        ("mixserve_edge_session_rebuilds_total", link.num_rebuilds, "counter")]
    for name, amount, kind in series:
        lines += [f"# TYPE {name} {kind}", f"{name} {amount}"]
    return "\n".join(lines) + "\n"
