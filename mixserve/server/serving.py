"""Running one HTTP request on the engine: add its prompts, gather deltas, stream or collect, abort on exit.

Invariant: every engine request an HTTP request adds is either finished or aborted when the handler
returns, whatever happens (client disconnect, error, cancellation at shutdown), so its KV blocks are freed.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.types import Receive, Scope, Send

from mixserve.engine.async_engine import AsyncEngine
from mixserve.outputs import RequestOutput
from mixserve.sampling_params import SamplingParams
from mixserve.server.errors import ApiError, as_api_error, error_frame
from mixserve.server.formats import Choice, Usage
from mixserve.server.limits import RequestLimits
from mixserve.server.metrics import ServerMetrics
from mixserve.server.params import Limits, Prompt


@dataclass
class ServerState:
    """What the routes need; `engine` is None while the model loads."""

    model_name: str
    metrics: ServerMetrics | None = None
    engine: AsyncEngine | None = None
    tokenizer: Any = None
    limits: Limits | None = None
    model_path: str = ""
    created: int = field(default_factory=lambda: int(time.time()))
    load_error: str | None = None
    reject_unknown_fields: bool = False
    request_limits: RequestLimits = field(default_factory=RequestLimits)
    scaling: Any = None
    """Optional hook `(state, body, prompt, params) -> awaitable response dict` for strategy requests."""
    router: Any = None
    """Multi-model servers: a `mixserve.mixture.server.PoolRouter` (request `model` -> a pinned per-model
    state); None: this state serves its one model."""
    render_metrics: Callable[[], bytes] | None = None
    """Multi-model servers: renders /metrics for every model and the pool."""
    cloud: Any = None
    """`mixserve serve --cloud-split-layer K`: the `mixserve.edge` CloudService behind /v1/edge/ws."""
    usage_extra: Callable[[list[str]], dict[str, Any]] | None = None
    """Extra usage fields of a response from its engine request ids (the split edge: where tokens were
    decided, link bytes); None: none."""

    def ready(self) -> AsyncEngine:
        if self.load_error is not None:
            raise ApiError(503, f"the model failed to load: {self.load_error}", code="model_load_failed")
        if self.engine is None:
            raise ApiError(503, "the model is still loading", code="loading")
        if not self.engine.healthy:
            raise ApiError(503, self.engine.error or "the engine is not running", code="engine_unavailable")
        return self.engine

    token_texts: dict[int, str] = field(default_factory=dict)

    def token_text(self, token_id: int) -> str:
        """The text of one token as logprobs show it (special tokens included)."""
        text = self.token_texts.get(token_id)
        if text is None:
            text = self.token_texts[token_id] = str(self.tokenizer.decode([token_id], skip_special_tokens=False))
        return text


class Run:
    """The engine requests of one HTTP request (one per prompt) and their accumulated choices."""

    def __init__(self, state: ServerState, kind: str, prompts: list[Prompt], params: SamplingParams) -> None:
        self.state = state
        self.engine = state.ready()
        self.request_id = self.engine.new_id(kind)
        """The response id; its prompts run as engine requests `{request_id}-{i}`."""
        self.prompts = prompts
        self.params = params
        self.ids = [f"{self.request_id}-{i}" for i in range(len(prompts))]
        self.choices: dict[int, Choice] = {}
        self.cached: dict[str, int] = {}
        self.prompt_logprobs: dict[int, list[Any]] = {}
        self.finished: set[str] = set()
        self.queue: asyncio.Queue[RequestOutput | BaseException] = asyncio.Queue()
        self.added: list[str] = []
        self.pending: str | None = None
        self.started = self.closed = False
        assert state.metrics is not None
        self.metrics = state.metrics
        self.timing = self.metrics.start()

    def choice(self, prompt_index: int, sample_index: int) -> Choice:
        index = prompt_index * self.params.n + sample_index
        return self.choices.setdefault(index, Choice(index))

    async def start(self) -> None:
        """Add every prompt to the engine; what the engine rejects raises here, before any response is sent.

        Idempotent. On failure (or cancellation) whatever was added is aborted.
        """
        if self.started:
            return
        self.started = True
        try:
            for rid, prompt in zip(self.ids, self.prompts):
                self.pending = rid
                await self.engine.add(rid, prompt.token_ids, self.params, prompt.text, queue=self.queue)
                self.added.append(rid)
                self.pending = None
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Abort what is still running (idempotent; safe from a cancelled task or a response that never ran)."""
        if self.closed:
            return
        self.closed = True
        leftover = [rid for rid in self.added if rid not in self.finished]
        if self.pending is not None:  # an add in flight: the abort runs after it on the engine thread
            self.engine.abort(self.pending)
        for rid in leftover:
            self.engine.abort(rid)
        if self.added and (leftover or len(self.added) < len(self.ids)):
            reasons = [c.finish_reason or "abort" for c in self.choices.values()] or ["abort"]
            self.metrics.finish(self.timing, [len(p.token_ids) for p in self.prompts], reasons)

    async def deltas(self) -> AsyncGenerator[tuple[int, RequestOutput], None]:
        """Start (if not yet), then yield (prompt index, delta) until all finish; abort leftovers on exit."""
        try:
            await self.start()
            while len(self.finished) < len(self.added):
                item = await self.queue.get()
                if isinstance(item, BaseException):
                    raise item
                index = self.ids.index(item.request_id)
                self._fold(index, item)
                yield index, item
        finally:
            self.close()

    def _fold(self, index: int, delta: RequestOutput) -> None:
        self.metrics.observe(self.timing, delta)
        for part in delta.outputs:
            self.choice(index, part.index).add(part)
        self.cached[delta.request_id] = max(self.cached.get(delta.request_id, 0), delta.num_cached_tokens)
        if delta.prompt_logprobs:
            self.prompt_logprobs[index] = delta.prompt_logprobs
        if delta.finished:
            self.finished.add(delta.request_id)
            if len(self.finished) == len(self.ids):
                reasons = [c.finish_reason or "abort" for c in self.choices.values()]
                self.metrics.finish(self.timing, [len(p.token_ids) for p in self.prompts], reasons)

    def usage(self, drop_generated: bool = False) -> Usage:
        """Prompt tokens count once per prompt, however many samples fork from it."""
        generated = 0 if drop_generated else sum(len(c.token_ids) for c in self.choices.values())
        extra = self.state.usage_extra(self.ids) if self.state.usage_extra is not None else {}
        return Usage(prompt_tokens=sum(len(p.token_ids) for p in self.prompts), completion_tokens=generated,
                     cached_tokens=sum(self.cached.values()), extra=extra)

    def failed(self) -> str | None:
        """The error message when every choice failed (the request itself is bad or the engine broke)."""
        errors = [c.error for c in self.choices.values() if c.error]
        return errors[0] if errors and len(errors) == len(self.choices) else None


async def collect(run: Run, request: Request) -> None:
    """Drive `run` to completion; abort it if the client disconnects first."""

    async def drain() -> None:
        async with contextlib.aclosing(run.deltas()) as deltas:
            async for _ in deltas:
                pass

    task = asyncio.ensure_future(drain())
    try:
        while not task.done():
            await asyncio.wait({task}, timeout=0.5)
            if not task.done() and await request.is_disconnected():
                task.cancel()
                raise ApiError(499, "client disconnected")
        task.result()
    finally:
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task


async def scaled_response(state: ServerState, body: Any, prompts: list[Prompt], params: SamplingParams,
                          obj: str) -> Any:
    """A `strategy` request: one prompt, answered by the scaling hook (SSE progress when streamed)."""
    if state.scaling is None:
        raise ApiError(400, "invalid field strategy: inference-time scaling is not available on this server",
                       param="strategy")
    if len(prompts) != 1:
        raise ApiError(400, "invalid field strategy: needs exactly one prompt", param="strategy")
    answer = await state.scaling(state, body, prompts[0], params, obj)
    return JSONResponse(answer) if isinstance(answer, dict) else answer


class RunStreamingResponse(StreamingResponse):
    """The SSE response of a started `Run`: the run is closed (leftovers aborted) however the response ends,
    even when the client went away before its body began."""

    def __init__(self, run: Run, content: AsyncIterator[str]) -> None:
        super().__init__(content, media_type="text/event-stream")
        self.run = run
        self.on_close: list[Callable[[], None]] = []
        """Called once the response ended, however (a multi-model server unpins the model here)."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.run.close()
            for callback in self.on_close:
                callback()


def sse(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload, separators=(',', ':'))}\n\n"


async def stream_frames(run: Run, frames: Callable[[int, RequestOutput], list[dict[str, Any]]],
                        first: Callable[[], list[dict[str, Any]]],
                        last: Callable[[], Awaitable[list[dict[str, Any]]]]) -> AsyncIterator[str]:
    """SSE body: `first()` frames, then `frames(prompt_index, delta)` per delta, `last()`, then [DONE].

    An error after the stream started is sent as an error frame (the status was already 200).
    """
    try:
        for payload in first():
            yield sse(payload)
        async with contextlib.aclosing(run.deltas()) as deltas:
            async for index, delta in deltas:
                for payload in frames(index, delta):
                    yield sse(payload)
        for payload in await last():
            yield sse(payload)
    except asyncio.CancelledError:
        raise
    except Exception as exc:  # noqa: BLE001 - reported in-band
        run.metrics.error(as_api_error(exc).status)
        yield error_frame(as_api_error(exc))
    yield "data: [DONE]\n\n"
