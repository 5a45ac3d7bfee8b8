"""The replicas as the ingress sees them: Ray actors started, polled for load and health, replaced.

Invariant: a replica is `starting`, `ready` (routable), `draining` (finishing or migrating its requests,
not routable) or `gone`. A replica whose actor dies (process killed, node lost) or whose engine stopped
is `gone` at once, forgotten by the router and, with `replace_dead`, replaced by a new one.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from mixserve.cluster.config import ClusterConfig
from mixserve.cluster.replica import EngineReplica, ReplicaInfo
from mixserve.cluster.router import ReplicaLoad
from mixserve.config import EngineConfig

log = logging.getLogger("mixserve.cluster")


@dataclass(eq=False)
class ReplicaHandle:
    replica_id: str
    actor: Any
    state: str = "starting"
    info: ReplicaInfo | None = None
    stats: dict[str, float] = field(default_factory=dict)
    num_inflight: int = 0
    """Requests (legs) the ingress is streaming from it now."""
    num_routed: dict[str, int] = field(default_factory=dict)
    """Requests routed here, by routing reason."""

    def load(self) -> ReplicaLoad:
        return ReplicaLoad(self.num_inflight, self.stats.get("num_waiting", 0.0),
                           self.stats.get("kv_cache_usage", 0.0))


def is_replica_failure(exc: BaseException) -> bool:
    """Ray's errors for an actor that died or cannot be reached (imported lazily)."""
    import ray.exceptions

    return isinstance(exc, ray.exceptions.RayActorError | ray.exceptions.ActorUnavailableError)


class ReplicaPool:
    """Starts `config.replicas` engine actors and keeps that many alive (see the module doc)."""

    def __init__(self, config: ClusterConfig, engine_config: EngineConfig, cache_dir: str | None,
                 on_gone: Callable[[str], None] = lambda _: None) -> None:
        import ray

        self.ray = ray
        self.config = config
        self.engine_config = engine_config.with_options(num_threads=config.threads_per_replica)
        self.cache_dir = cache_dir
        self.on_gone = on_gone
        self.replicas: dict[str, ReplicaHandle] = {}
        self.num_deaths = 0
        self.num_replacements = 0
        self._ids = itertools.count()
        self._actor_cls: Any = ray.remote(num_cpus=config.threads_per_replica, max_restarts=0)(EngineReplica)
        self._tasks: set[asyncio.Task[Any]] = set()
        self._changed = asyncio.Event()
        self._closed = False

    # -- lifecycle --------------------------------------------------------------------------------
    async def start(self) -> None:
        """Start every replica; returns once all loaded (raises if none could)."""
        results = await asyncio.gather(*(self.spawn() for _ in range(self.config.replicas)),
                                       return_exceptions=True)
        errors = [r for r in results if isinstance(r, BaseException)]
        if len(errors) == len(results):
            raise RuntimeError(f"no replica could start: {errors[0]}")
        self._background(self._poll())

    async def spawn(self) -> ReplicaHandle:
        """Start one more replica and wait until its model is loaded."""
        replica_id = f"r{next(self._ids)}"
        actor = self._actor_cls.options(scheduling_strategy="SPREAD").remote(
            replica_id, self.engine_config, self.cache_dir)
        handle = ReplicaHandle(replica_id, actor)
        self.replicas[replica_id] = handle
        try:
            info: ReplicaInfo = await asyncio.wait_for(actor.describe.remote(), self.config.start_timeout_s)
        except BaseException as exc:
            log.error("replica %s failed to start: %s", replica_id, exc)
            self._drop(handle)
            raise
        handle.info, handle.state = info, "ready"
        self._changed.set()
        log.info("replica %s ready on %s (pid %d, %.1fs)", replica_id, info.host, info.pid, info.load_seconds)
        return handle

    def live(self) -> list[ReplicaHandle]:
        """Routable replicas."""
        return [h for h in self.replicas.values() if h.state == "ready"]

    async def wait_live(self, timeout_s: float) -> None:
        """Until some replica is routable (raises TimeoutError)."""
        async def wait() -> None:
            while not self.live():
                self._changed.clear()
                await self._changed.wait()
        await asyncio.wait_for(wait(), timeout_s)

    def mark_dead(self, handle: ReplicaHandle, why: BaseException | str) -> None:
        """`handle` died: forget it, and start a replacement (once per replica)."""
        if handle.state == "gone":
            return
        log.warning("replica %s is gone: %s", handle.replica_id, why)
        self.num_deaths += 1
        self._drop(handle)
        if self.config.replace_dead and not self._closed:
            self.num_replacements += 1
            self._background(self.spawn())

    def remove(self, handle: ReplicaHandle) -> None:
        """Stop a (drained) replica on purpose."""
        self._drop(handle)

    async def shutdown(self) -> None:
        self._closed = True
        for task in list(self._tasks):
            task.cancel()
        for handle in list(self.replicas.values()):
            self._drop(handle)

    # -- internals ----------------------------------------------------------------------------
    def _drop(self, handle: ReplicaHandle) -> None:
        handle.state = "gone"
        self.replicas.pop(handle.replica_id, None)
        with contextlib.suppress(Exception):
            self.ray.kill(handle.actor, no_restart=True)
        self.on_gone(handle.replica_id)
        self._changed.set()

    def _background(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.debug("background task failed: %s", task.exception())

    async def _poll(self) -> None:
        """Refresh every replica's stats; a replica that cannot answer because it died is marked dead."""
        while not self._closed:
            handles = [h for h in self.replicas.values() if h.state in ("ready", "draining")]
            results = await asyncio.gather(*(asyncio.wait_for(h.actor.stats.remote(), 30) for h in handles),
                                           return_exceptions=True)
            for handle, result in zip(handles, results):
                if isinstance(result, dict):
                    handle.stats = result
                elif isinstance(result, BaseException) and (is_replica_failure(result) or
                                                            "EngineDeadError" in type(result).__name__):
                    self.mark_dead(handle, result)
            await asyncio.sleep(self.config.stats_interval_s)
