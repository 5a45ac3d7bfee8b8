"""Strategy requests: `strategy`, `budget`, `verifier`, `extractor` (and `reference` for
`verifier="task"`) on completions/chat run a scaling strategy inside the engine (samples share the
prompt's KV through fork) and answer with the selected text; `usage` carries the full compute
accounting under `usage.scaling`.

With `stream=true` the response is SSE: one chunk per progress event (`choices: []`, the event under
`scaling_event`: each finished candidate with its answer, each verifier score, then the selection),
then the final chunk in the normal chunk shape (the selected text as one delta, `finish_reason`,
`usage` and `scaling`), then `[DONE]`. Official clients read the event chunks as chunks without choices.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi.responses import StreamingResponse

from mixserve.sampling_params import SamplingParams
from mixserve.scaling import ModelCost, ScaleResult, ScalingError, make_strategy
from mixserve.scaling.answers import canonical, get_extractor
from mixserve.scaling.progress import ProgressController
from mixserve.scaling.verifiers import FunctionVerifier
from mixserve.server.errors import ApiError, as_api_error, error_frame
from mixserve.server.params import Prompt
from mixserve.server.serving import ServerState, sse

FIELDS = ("strategy", "budget", "verifier", "extractor", "reference")


def reference_verifier(reference: str, extract: Any) -> FunctionVerifier:
    """`verifier="task"` over HTTP: 1 when the extracted answer equals the canonical `reference`."""
    want = canonical(reference)
    return FunctionVerifier(lambda text: float(extract(text) == want), name="task")


def build_strategy(state: ServerState, body: Any, prompt: Prompt, params: SamplingParams, cost: ModelCost | None,
           strategy_id: str) -> Any:
    extractor = getattr(body, "extractor", None)
    reference = getattr(body, "reference", None)
    limits = getattr(state, "request_limits", None)  # None: a cluster replica rebuilding a validated spec
    cap = limits.max_strategy_budget if limits is not None else None
    if cap is not None and isinstance(body.budget, int) and body.budget > cap:
        raise ApiError(400, f"invalid field budget: budget={body.budget} exceeds this server's "
                       f"max_strategy_budget={cap} (mixserve serve --max-strategy-budget)", param="budget")
    try:
        extract = get_extractor(extractor)
        verifier: Any = body.verifier
        if reference is not None:
            if verifier not in (None, "task"):
                raise ScalingError(f"invalid reference: it is used by verifier='task', not {verifier!r}",
                                   field="reference")
            verifier = reference_verifier(reference, extract)
        elif verifier == "task":
            raise ScalingError("invalid verifier='task': send the expected answer in `reference`", field="reference")
        return make_strategy(body.strategy, prompt.token_ids, body.budget, params, verifier, state.tokenizer,
                             cost=cost, strategy_id=strategy_id, extract=extract)
    except ScalingError as exc:
        field = exc.field if exc.field in FIELDS else "strategy"
        raise ApiError(400, str(exc), param=field) from exc


def make_scaling_hook(cost: ModelCost | None) -> Any:
    """The `ServerState.scaling` callable for a model of this cost: returns a response dict, or an SSE
    `StreamingResponse` for `stream=true`."""

    async def run(state: ServerState, body: Any, prompt: Prompt, params: SamplingParams, obj: str) -> Any:
        engine = state.ready()
        strategy = build_strategy(state, body, prompt, params, cost, engine.new_id("scale"))
        chat = obj == "chat.completion"
        head = {"id": engine.new_id("chatcmpl" if chat else "cmpl"), "created": int(time.time()),
                "model": state.model_name}
        if not body.stream:
            result = await engine.run_controller(strategy)
            count_verifier(state, result)
            return {**head, "object": obj, **final_fields(result, chat, stream=False)}
        return StreamingResponse(_stream(state, engine, strategy, head, chat), media_type="text/event-stream")

    return run


def count_verifier(state: ServerState, result: ScaleResult) -> None:
    if state.metrics is not None:
        u = result.usage
        tokens = u.verifier_prefill_tokens + u.verifier_generated_tokens
        state.metrics.verifier_tokens.labels(state.model_name).inc(tokens)


async def _stream(state: ServerState, engine: Any, strategy: Any, head: dict[str, Any],
                  chat: bool) -> AsyncIterator[str]:
    loop = asyncio.get_running_loop()
    events: asyncio.Queue[dict[str, Any]] = asyncio.Queue()

    def emit(event: dict[str, Any]) -> None:  # on the engine thread
        loop.call_soon_threadsafe(events.put_nowait, event)

    task = asyncio.ensure_future(engine.run_controller(ProgressController(strategy, emit)))
    async for chunk in strategy_sse(state, task, events, head, chat):
        yield chunk


async def strategy_sse(state: ServerState, task: asyncio.Future[ScaleResult], events: asyncio.Queue[Any],
                       head: dict[str, Any], chat: bool) -> AsyncIterator[str]:
    """The SSE stream of a strategy request: one chunk per progress event from `events` while `task`
    runs (here, or on a cluster replica), then the final chunk in the normal shape and `[DONE]`; an error
    after the 200 is sent in-band. Cancels `task` if the client goes away."""
    obj = "chat.completion.chunk" if chat else "text_completion"

    def event_chunk(ev: Any) -> str:
        return sse({**head, "object": obj, "choices": [], "scaling_event": ev})

    try:
        while not task.done():
            getter = asyncio.ensure_future(events.get())
            await asyncio.wait({getter, task}, return_when=asyncio.FIRST_COMPLETED)
            if getter.done():
                yield event_chunk(getter.result())
            else:
                getter.cancel()
        while not events.empty():
            yield event_chunk(events.get_nowait())
        try:
            result = task.result()
            count_verifier(state, result)
            yield sse({**head, "object": obj, **final_fields(result, chat, stream=True)})
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - reported in-band (the status was already 200)
            yield error_frame(as_api_error(exc))
        yield "data: [DONE]\n\n"
    finally:
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task


def final_fields(result: ScaleResult, chat: bool, stream: bool) -> dict[str, Any]:
    finish = (result.candidates[result.selected[0]].finish_reason if result.selected else None) or "stop"
    choice: dict[str, Any]
    if chat:
        key = "delta" if stream else "message"
        choice = {"index": 0, key: {"role": "assistant", "content": result.text}, "logprobs": None,
                  "finish_reason": finish}
    else:
        choice = {"index": 0, "text": result.text, "logprobs": None, "finish_reason": finish}
    return {"choices": [choice], "usage": result.usage.openai_usage(),
            "scaling": {"strategy": result.strategy, "answer": result.answer, "selected": list(result.selected),
                        "candidates": [{"index": c.index, "answer": c.answer, "score": c.score,
                                        "num_tokens": c.num_tokens, "finish_reason": c.finish_reason}
                                       for c in result.candidates],
                        "info": dict(result.info)}}
