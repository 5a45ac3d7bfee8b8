"""`ClusterEngine`: the engine seam of the OpenAI server (what `AsyncEngine` offers it), over replicas.

The server's routes call `new_id`, `add`, `abort`, `healthy`, `error` and `stats` exactly as on a local
`AsyncEngine`; here `add` routes the request (`Router`) to a replica, streams its deltas from the
replica's `generate` into the caller's queue, and keeps the stream whole across replica deaths and
migrations (`Flight`): every unfinished sample resumes on a live replica from the tokens its client
has. Every call runs on the server's event loop.

Unseeded sampling requests get a random seed here, so that (with per-position seeds) their continuation
after a resume is exactly what the interrupted replica would have produced.
"""

from __future__ import annotations

import asyncio
import contextvars
import itertools
import logging
import random
import uuid
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

from mixserve.cluster.flight import Flight, Leg
from mixserve.cluster.pool import ReplicaHandle, ReplicaPool, is_replica_failure
from mixserve.cluster.replica import ERRORS, Admission
from mixserve.cluster.router import Route, Router
from mixserve.engine.async_engine import EngineDeadError
from mixserve.engine.engine import QueueFullError, RequestError, ResumePoint
from mixserve.outputs import FinishReason, RequestOutput
from mixserve.sampling_params import SamplingParams

log = logging.getLogger("mixserve.cluster")
SESSION: contextvars.ContextVar[str | None] = contextvars.ContextVar("mixserve_session", default=None)
"""The session of the HTTP request being served (set by the ingress middleware from a header)."""


class ReplicaFailed(Exception):
    """A replica's engine stopped while streaming (treated like the replica dying)."""


class ClusterEngine:
    """Engine-like front of a `ReplicaPool` (see the module doc)."""

    def __init__(self, pool: ReplicaPool, router: Router, wait_for_replica_s: float = 600.0,
                 kv_migration: str = "blocks") -> None:
        _check_kv(kv_migration)
        self.pool = pool
        self.kv_migration = kv_migration
        """Default of `migrate` and `drain`: blocks (KV moves) or recompute (see `ClusterConfig.migration_kv`)."""
        self.router = router
        self.wait_for_replica_s = wait_for_replica_s
        self.flights: dict[str, Flight] = {}
        self.listeners: list[Callable[[list[RequestOutput]], None]] = []
        self.error: str | None = None
        self.num_failovers = 0
        """Samples resumed on another replica after theirs died."""
        self.num_migrations = 0
        self.migration_pauses_s: list[float] = []
        self.strategies: dict[str, str] = {}
        """Strategy requests running (`cluster.scaling`): strategy id -> replica id."""
        self.num_strategy_reruns = 0
        """Strategies rerun on another replica after theirs died."""
        self.failover_pauses_s: list[float] = []
        self._prefix = uuid.uuid4().hex[:8]
        self._counter = itertools.count()
        self._closed = False

    # -- the AsyncEngine seam -------------------------------------------------------------------
    @property
    def healthy(self) -> bool:
        return not self._closed and bool(self.pool.live() or self.pool.replicas)

    @property
    def stats(self) -> dict[str, float]:
        """Sum of the replicas' engine stats (KV usage: their mean)."""
        handles = [h for h in self.pool.replicas.values() if h.stats]
        total: dict[str, float] = {}
        for h in handles:
            for key, value in h.stats.items():
                total[key] = total.get(key, 0.0) + value
        if handles:
            total["kv_cache_usage"] = total.get("kv_cache_usage", 0.0) / len(handles)
        return total

    def new_id(self, kind: str = "req") -> str:
        return f"{kind}-{self._prefix}{next(self._counter):x}"

    async def add(self, request_id: str, prompt_token_ids: Sequence[int], params: SamplingParams,
                  prompt: str | None = None, queue: asyncio.Queue[RequestOutput | BaseException] | None = None,
                  ) -> asyncio.Queue[RequestOutput | BaseException]:
        """Route and start a request; raises what the replica's engine rejects it with (400, 429)."""
        if self._closed:
            raise EngineDeadError("the server is shutting down")
        if request_id in self.flights:
            raise RequestError(f"request_id {request_id!r} is already in use")
        if params.seed is None:
            params = replace(params, seed=random.getrandbits(63))
        queue = queue if queue is not None else asyncio.Queue()
        flight = Flight(request_id, list(prompt_token_ids), params, prompt, queue, SESSION.get())
        flight.on_pause = self._on_pause
        self.flights[request_id] = flight
        try:
            await self._start_leg(flight, list(range(params.n)), first=True)
        except BaseException:
            self.flights.pop(request_id, None)
            raise
        return queue

    def abort(self, request_id: str) -> None:
        """Abort a request; its stream gets the final delta (fire and forget)."""
        flight = self.flights.get(request_id)
        if flight is None or flight.aborted:
            return
        flight.aborted = True
        for leg in list(flight.legs):
            leg.replica.actor.abort.remote(leg.remote_id)

    async def run_controller(self, controller: Any) -> Any:
        raise RequestError("controllers do not cross to replicas: strategy requests run through "
                           "cluster.scaling (the ingress's scaling hook)")

    def shutdown(self) -> None:
        self._closed = True
        for flight in list(self.flights.values()):
            for leg in list(flight.legs):
                if leg.task is not None:
                    leg.task.cancel()
            flight.queue.put_nowait(EngineDeadError("the server is shutting down"))
        self.flights.clear()

    # -- migration ------------------------------------------------------------------------------
    async def migrate(self, request_id: str, target: str | None = None, kv: str | None = None) -> int:
        """Move a running request's legs to `target` (or a routed replica): stop streaming from the old
        replica, then resume there from the client's tokens. `kv` (default `kv_migration`): blocks, the old
        replica exports each sample's full KV blocks and stops it in one engine command, the new one imports
        them into its prefix cache and recomputes only the last partial block; recompute, it recomputes all.
        Returns how many legs moved."""
        kv = _check_kv(kv or self.kv_migration)
        flight = self.flights.get(request_id)
        if flight is None:
            raise RequestError(f"request {request_id!r} is not in flight")
        moved = 0
        for leg in list(flight.legs):
            if leg.replica.replica_id == target:
                continue
            await self._stop_leg(flight, leg, abort=kv == "recompute")
            samples = flight.unfinished(leg)
            exports = self._export(leg, samples) if kv == "blocks" else {}
            if samples:
                flight.interrupted("migration")
                self.num_migrations += 1
                await self._resume(flight, samples, exclude={leg.replica.replica_id}, target=target,
                                   exports=exports)
                moved += 1
        return moved

    def _export(self, leg: Leg, samples: list[int]) -> dict[int, Any]:
        """Ask the leg's replica to export the KV of `samples` and stop the leg: client sample -> the
        ObjectRef of its `KVExport` (or None). The bytes go replica to replica, never through here."""
        if not samples:
            leg.replica.actor.abort.remote(leg.remote_id)
            return {}
        replica_index = {client: remote for remote, client in leg.index_map.items()}
        method = leg.replica.actor.export_kv
        if len(samples) > 1:
            method = method.options(num_returns=len(samples))
        refs = method.remote(leg.remote_id, [replica_index[s] for s in samples])
        return dict(zip(samples, refs if len(samples) > 1 else [refs], strict=True))

    async def drain(self, replica_id: str) -> int:
        """Stop routing to a replica, migrate its requests away, then stop it. Returns requests moved."""
        handle = self.pool.replicas.get(replica_id)
        if handle is None:
            raise RequestError(f"no replica {replica_id!r}")
        if len(self.pool.live()) <= 1 and handle.state == "ready":
            raise RequestError(f"replica {replica_id!r} is the last one; add one before draining it")
        handle.state = "draining"
        moved = 0
        for flight in list(self.flights.values()):
            if any(leg.replica is handle for leg in flight.legs):
                moved += await self.migrate(flight.request_id, target=None)
        self.router.forget(replica_id)
        self.pool.remove(handle)
        return moved

    # -- legs -------------------------------------------------------------------------------------
    async def _start_leg(self, flight: Flight, samples: list[int], first: bool = False,
                         exclude: set[str] | None = None, target: str | None = None, kv: Any = None) -> None:
        """Start `samples` of `flight` on one replica (all samples of a new request, or one resumed)."""
        params, resume = (flight.params, None) if first else flight.resume_args(samples[0])
        tried = set(exclude or ())
        while True:
            handle, route = await self._pick(flight, tried, target)
            tried.add(handle.replica_id)
            target = None
            remote_id = f"{flight.request_id}.{next(self._counter):x}"
            stream = handle.actor.generate.options(num_returns="streaming").remote(
                remote_id, flight.prompt_token_ids, params, flight.prompt, resume, None if kv is None else [kv])
            try:
                admission: Admission = await (await stream.__anext__())
            except Exception as exc:  # noqa: BLE001 - a dead replica: try another
                if not is_replica_failure(exc):
                    raise
                self.pool.mark_dead(handle, exc)
                continue
            if admission.error_kind is not None:
                if first and admission.error_kind != "EngineDeadError":
                    raise ERRORS[admission.error_kind](admission.message)
                if admission.error_kind == "EngineDeadError":
                    self.pool.mark_dead(handle, admission.message)
                continue  # a resume that this replica cannot take now: another one
            handle.num_routed[route.reason] = handle.num_routed.get(route.reason, 0) + 1
            self.router.record(route, flight.prompt_token_ids, flight.session)
            index_map = {i: s for i, s in enumerate(samples)} if first else {0: samples[0]}
            leg = Leg(handle, remote_id, index_map, stream, first=first)
            handle.num_inflight += 1
            flight.legs.add(leg)
            leg.task = asyncio.ensure_future(self._run_leg(flight, leg))
            if flight.aborted:  # aborted while the replica admitted it
                handle.actor.abort.remote(remote_id)
            return

    async def _pick(self, flight: Flight, tried: set[str], target: str | None) -> tuple[ReplicaHandle, Route]:
        while True:
            live = {h.replica_id: h for h in self.pool.live() if h.replica_id not in tried}
            if target is not None and target in live:
                return live[target], Route(target, "migration")
            if live:
                route = self.router.choose(flight.prompt_token_ids, {k: h.load() for k, h in live.items()},
                                           flight.session)
                return live[route.replica_id], route
            if tried and self.pool.live():
                tried.clear()  # every live replica refused a resume once: try them again
                await asyncio.sleep(0.05)
                continue
            await self.pool.wait_live(self.wait_for_replica_s)

    async def _run_leg(self, flight: Flight, leg: Leg) -> None:
        try:
            async for ref in leg.stream:
                item = await ref
                if isinstance(item, Admission):
                    raise ReplicaFailed(item.message)
                for out in item:
                    delta = flight.deliver(leg, out)
                    if delta is not None:
                        flight.queue.put_nowait(delta)
            if flight.unfinished(leg):
                raise ReplicaFailed("the replica ended the stream early")
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - a replica failure is survived; anything else ends the request
            if not (is_replica_failure(exc) or isinstance(exc, ReplicaFailed)):
                log.exception("stream of %s failed", flight.request_id)
                flight.queue.put_nowait(exc)
                return
            self._forget_leg(flight, leg)
            self.pool.mark_dead(leg.replica, exc)
            samples = flight.unfinished(leg)
            if flight.aborted:
                self._put(flight, flight.end(samples, FinishReason.ABORT))
            elif samples:
                flight.interrupted("failover")
                self.num_failovers += len(samples)
                await self._resume(flight, samples, exclude={leg.replica.replica_id})
        finally:
            self._forget_leg(flight, leg)

    async def _resume(self, flight: Flight, samples: list[int], exclude: set[str], target: str | None = None,
                      exports: dict[int, Any] | None = None) -> None:
        for sample in samples:
            try:
                await self._start_leg(flight, [sample], exclude=exclude, target=target,
                                      kv=(exports or {}).get(sample))
            except Exception as exc:  # noqa: BLE001 - no replica could take it: the sample fails
                self._put(flight, flight.end([sample], FinishReason.ERROR, f"resume failed: {exc}"))

    async def _stop_leg(self, flight: Flight, leg: Leg, abort: bool = True) -> None:
        """Stop streaming a leg (migration): nothing it sends from now on reaches the client. `abort`: also
        abort it on its replica (else the caller does, with `_export`)."""
        if leg.task is not None:
            leg.task.cancel()
            try:
                await leg.task
            except asyncio.CancelledError:
                pass
        self._forget_leg(flight, leg)
        if abort:
            leg.replica.actor.abort.remote(leg.remote_id)

    def _forget_leg(self, flight: Flight, leg: Leg) -> None:
        if leg in flight.legs:
            flight.legs.discard(leg)
            leg.replica.num_inflight -= 1
        if not flight.legs and (flight.finished or flight.aborted):
            self.flights.pop(flight.request_id, None)

    def _on_pause(self, kind: str, seconds: float) -> None:
        (self.migration_pauses_s if kind == "migration" else self.failover_pauses_s).append(seconds)

    def _put(self, flight: Flight, delta: RequestOutput | None) -> None:
        if delta is not None:
            flight.queue.put_nowait(delta)


def _check_kv(kv: str) -> str:
    if kv not in ("blocks", "recompute"):
        raise RequestError(f"invalid kv {kv!r}: must be blocks or recompute")
    return kv


__all__ = ["SESSION", "ClusterEngine", "QueueFullError", "RequestError", "ResumePoint"]
