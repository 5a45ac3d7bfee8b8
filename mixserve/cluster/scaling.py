"""Strategy requests (`strategy`, `budget`, ...) on the cluster: the whole strategy runs on one replica.

The ingress validates the request exactly as the single-process server does (same 400s: it builds the
strategy once and throws it away), routes it like a normal request (prefix/load/session aware), and the
replica builds it again from a `ScaleSpec` and runs it as a controller on its engine (samples fork from
one prefill there), streaming progress events and then the `ScaleResult`. The response (and the SSE
progress events with `stream=true`) has the single-process server's shape (`server/scaling.py`).

A replica that dies mid-strategy is survived: the strategy reruns on another replica (the ingress fixes
a seed for unseeded requests and the strategy id, so the rerun samples the same candidates) and
progress events the client already has are not sent twice.

Why not split the N samples over replicas: each replica would prefill the prompt once and the ingress
would select; that pays only when N x generated tokens dominate the prompt and replicas are idle (see
docs/design-notes.md); on one replica the N samples share one prefill and one KV prefix.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, replace
from types import SimpleNamespace
from typing import Any

from fastapi.responses import StreamingResponse

from mixserve.cluster.ingress import SESSION, ReplicaFailed
from mixserve.cluster.pool import ReplicaHandle, is_replica_failure
from mixserve.cluster.replica import ERRORS, Admission
from mixserve.sampling_params import SamplingParams
from mixserve.scaling import ModelCost, ScaleResult
from mixserve.server.params import Prompt
from mixserve.server.scaling import build_strategy, count_verifier, final_fields, strategy_sse
from mixserve.server.serving import ServerState

Event = dict[str, Any]


@dataclass(frozen=True)
class ScaleSpec:
    """What a replica needs to build the same strategy the ingress validated."""

    strategy: str
    budget: int | None
    verifier: str | None
    extractor: str | None
    reference: str | None
    strategy_id: str
    prompt_token_ids: tuple[int, ...]
    params: SamplingParams

    @classmethod
    def of(cls, body: Any, prompt: Prompt, params: SamplingParams, strategy_id: str) -> ScaleSpec:
        return cls(body.strategy, body.budget, body.verifier, getattr(body, "extractor", None),
                   getattr(body, "reference", None), strategy_id, tuple(prompt.token_ids), params)

    def build(self, tokenizer: Any, cost: ModelCost | None) -> Any:
        """The strategy (raises the server's `ApiError` 400 on bad fields)."""
        state = SimpleNamespace(tokenizer=tokenizer)
        return build_strategy(state, self, Prompt(list(self.prompt_token_ids), None), self.params,  # type: ignore[arg-type]
                              cost, self.strategy_id)


class StrategyFailed(RuntimeError):
    """The strategy itself failed on the replica (not the replica)."""


async def run_remote(engine: Any, spec: ScaleSpec, on_event: Callable[[Event], None] | None = None,
                     session: str | None = None) -> ScaleResult:
    """Run `spec` on a routed replica; rerun elsewhere when that replica dies. `engine`: a ClusterEngine."""
    sent: set[str] = set()
    tried: set[str] = set()
    while True:
        handle = await _pick(engine, spec, tried, session)
        tried.add(handle.replica_id)
        handle.num_inflight += 1
        engine.strategies[spec.strategy_id] = handle.replica_id
        stream = handle.actor.scale.options(num_returns="streaming").remote(spec, on_event is not None)
        try:
            async for ref in stream:
                item = await ref
                if isinstance(item, Admission):
                    if item.error_kind is None:
                        continue  # accepted
                    if item.error_kind == "EngineDeadError":
                        raise ReplicaFailed(item.message)  # the replica's engine stopped: like a death
                    raise ERRORS.get(item.error_kind or "", StrategyFailed)(item.message)
                if isinstance(item, ScaleResult):
                    return item
                for event in item:
                    key = json.dumps(event, sort_keys=True, default=str)
                    if on_event is not None and key not in sent:
                        sent.add(key)
                        on_event(event)
            raise ReplicaFailed("the replica ended the strategy stream without a result")
        except asyncio.CancelledError:
            handle.actor.abort_scale.remote(spec.strategy_id)
            raise
        except Exception as exc:
            if not (is_replica_failure(exc) or isinstance(exc, ReplicaFailed)):
                raise
            engine.pool.mark_dead(handle, exc)
            engine.num_strategy_reruns += 1
        finally:
            handle.num_inflight -= 1
            engine.strategies.pop(spec.strategy_id, None)


async def _pick(engine: Any, spec: ScaleSpec, tried: set[str], session: str | None) -> ReplicaHandle:
    live = {h.replica_id: h for h in engine.pool.live() if h.replica_id not in tried}
    if not live:
        await engine.pool.wait_live(engine.wait_for_replica_s)
        live = {h.replica_id: h for h in engine.pool.live()}
    route = engine.router.choose(spec.prompt_token_ids, {k: h.load() for k, h in live.items()}, session)
    handle: ReplicaHandle = live[route.replica_id]
    handle.num_routed[route.reason] = handle.num_routed.get(route.reason, 0) + 1
    engine.router.record(route, spec.prompt_token_ids, session)
    return handle


def make_cluster_scaling_hook(engine: Any) -> Any:
    """The `ServerState.scaling` hook of the cluster ingress (same contract as `make_scaling_hook`)."""
    async def run(state: ServerState, body: Any, prompt: Prompt, params: SamplingParams, obj: str) -> Any:
        state.ready()
        strategy_id = engine.new_id("scale")
        build_strategy(state, body, prompt, params, None, strategy_id)  # validation: the server's 400s
        if params.seed is None:  # a rerun after a replica death samples the same candidates
            params = replace(params, seed=random.getrandbits(63))
        spec = ScaleSpec.of(body, prompt, params, strategy_id)
        chat = obj == "chat.completion"
        head = {"id": engine.new_id("chatcmpl" if chat else "cmpl"), "created": int(time.time()),
                "model": state.model_name}
        session = SESSION.get()
        if not body.stream:
            result = await run_remote(engine, spec, session=session)
            count_verifier(state, result)
            return {**head, "object": obj, **final_fields(result, chat, stream=False)}
        return StreamingResponse(_stream(state, engine, spec, head, chat, session), media_type="text/event-stream")

    return run


async def _stream(state: ServerState, engine: Any, spec: ScaleSpec, head: dict[str, Any], chat: bool,
                  session: str | None) -> AsyncIterator[str]:
    events: asyncio.Queue[Event] = asyncio.Queue()
    task = asyncio.ensure_future(run_remote(engine, spec, events.put_nowait, session))
    async for chunk in strategy_sse(state, task, events, head, chat):
        yield chunk
