"""`mixserve serve --ray`: the single-process OpenAI server, its engine replaced by a `ClusterEngine`.

Same routes, fields, errors and metrics (per-replica series carry a `replica` label), plus cluster
routes: `GET /v1/cluster/replicas`, `POST /v1/cluster/replicas` (add one), `POST
/v1/cluster/replicas/{id}/drain`, `GET /v1/cluster/requests`, `POST /v1/cluster/migrate`. Ray starts
(or is joined) when the server starts and is stopped (if it started it) when the server stops.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from starlette.types import ASGIApp, Receive, Scope, Send

import mixserve
from mixserve.cluster.config import ClusterConfig
from mixserve.cluster.ingress import SESSION, ClusterEngine
from mixserve.cluster.metrics import ClusterCollector
from mixserve.cluster.pool import ReplicaPool
from mixserve.cluster.router import Router
from mixserve.cluster.scaling import make_cluster_scaling_hook
from mixserve.config import EngineConfig
from mixserve.server.app import build_app
from mixserve.server.errors import ApiError, as_api_error, error_response
from mixserve.server.http import uvicorn_config
from mixserve.server.launch import ServeOptions
from mixserve.server.metrics import ServerMetrics
from mixserve.server.params import Limits
from mixserve.server.serving import ServerState

log = logging.getLogger("mixserve.cluster")


class SessionMiddleware:
    """Sets `SESSION` from the session header for the request it wraps (pure ASGI: no extra task)."""

    def __init__(self, app: ASGIApp, header: str) -> None:
        self.app = app
        self.header = header.lower().encode("latin-1")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        value = None
        if scope["type"] == "http":
            value = next((v.decode("latin-1") for k, v in scope["headers"] if k == self.header), None)
        token = SESSION.set(value)
        try:
            await self.app(scope, receive, send)
        finally:
            SESSION.reset(token)


def start_ray(cluster: ClusterConfig) -> bool:
    """Join `cluster.address` or start a private local Ray; True when this process started it."""
    import ray

    if ray.is_initialized():
        return False
    root = str(Path(mixserve.__file__).resolve().parent.parent)  # replicas import this same mixserve
    path = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH", "")) if p)
    runtime_env = {"env_vars": {"PYTHONPATH": path}}
    if cluster.address is not None:
        ray.init(address=cluster.address, runtime_env=runtime_env, log_to_driver=False)
        return False
    ray.init(num_cpus=cluster.local_num_cpus, include_dashboard=False, runtime_env=runtime_env,
             log_to_driver=False)
    return True


async def start_cluster(state: ServerState, config: EngineConfig, cluster: ClusterConfig,
                        cache_dir: str | None) -> ClusterEngine:
    """Ray, the replicas and the ingress tokenizer; publishes the engine on `state` once ready."""
    from mixserve.hub import resolve_model
    from mixserve.loading.checkpoint import load_checkpoint

    checkpoint = await asyncio.to_thread(lambda: load_checkpoint(resolve_model(config.model.model,
                                                                               cache_dir=cache_dir)))
    router = Router(cluster, config.cache.block_size)
    pool = ReplicaPool(cluster, config, cache_dir, on_gone=lambda rid: router.forget(rid))
    engine = ClusterEngine(pool, router, kv_migration=cluster.migration_kv)
    await pool.start()
    info = next(h.info for h in pool.replicas.values() if h.info is not None)
    state.tokenizer = checkpoint.tokenizer
    state.limits = Limits(max_model_len=info.max_model_len, vocab_size=info.vocab_size,
                          max_num_seqs=info.max_num_seqs * len(pool.replicas))
    state.model_path = info.model_path
    state.metrics = ServerMetrics(state.model_name, stats=lambda: engine.stats, engine_collector=False)
    state.metrics.registry.register(ClusterCollector(state.model_name, engine))
    state.scaling = make_cluster_scaling_hook(engine)
    state.engine = engine  # type: ignore[assignment]  # the AsyncEngine seam, over replicas
    return engine


def make_cluster_app(config: EngineConfig, cluster: ClusterConfig, options: ServeOptions
                     ) -> tuple[FastAPI, ServerState]:
    state = ServerState(model_name=options.served_model_name or config.model.model,
                        reject_unknown_fields=options.reject_unknown_fields, request_limits=options.limits)
    holder: dict[str, Any] = {}

    async def load() -> None:
        try:
            holder["started_ray"] = await asyncio.to_thread(start_ray, cluster)
            holder["engine"] = await start_cluster(state, config, cluster, options.cache_dir)
            log.info("cluster of %d replicas ready", cluster.replicas)
        except Exception as exc:  # noqa: BLE001 - reported by /health and every route
            log.error("cluster start failed: %s", exc)
            state.load_error = f"{type(exc).__name__}: {exc}"

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        task = asyncio.ensure_future(load())
        try:
            yield
        finally:
            task.cancel()
            engine: ClusterEngine | None = holder.get("engine")
            if engine is not None:
                engine.shutdown()
                await engine.pool.shutdown()
            if holder.get("started_ray"):
                import ray

                await asyncio.to_thread(ray.shutdown)

    app = build_app(state, lifespan=lifespan)
    app.add_middleware(SessionMiddleware, header=cluster.session_header)
    add_cluster_routes(app, holder)
    return app, state


def add_cluster_routes(app: FastAPI, holder: dict[str, Any]) -> None:
    def engine() -> ClusterEngine:
        if "engine" not in holder:
            raise ApiError(503, "the cluster is still starting", code="loading")
        return holder["engine"]  # type: ignore[no-any-return]

    async def guarded(run: Any) -> Any:
        try:
            return await run()
        except Exception as exc:  # noqa: BLE001 - OpenAI-shaped errors
            return error_response(as_api_error(exc))

    @app.get("/v1/cluster/replicas")
    async def replicas() -> Any:
        async def run() -> Any:
            e = engine()
            return {"replicas": [{
                "id": h.replica_id, "state": h.state, "pid": h.info.pid if h.info else None,
                "host": h.info.host if h.info else None, "inflight": h.num_inflight, "routed": h.num_routed,
                "stats": h.stats} for h in sorted(e.pool.replicas.values(), key=lambda h: h.replica_id)],
                "failovers": e.num_failovers, "migrations": e.num_migrations, "deaths": e.pool.num_deaths,
                "strategy_reruns": e.num_strategy_reruns,
                "failover_pauses_s": e.failover_pauses_s, "migration_pauses_s": e.migration_pauses_s,
                "kv_migration": e.kv_migration, "migrated_kv_tokens": e.stats.get("migrated_kv_tokens", 0.0),
                "recomputed_tokens": e.stats.get("recomputed_tokens", 0.0)}
        return await guarded(run)

    @app.post("/v1/cluster/replicas")
    async def add_replica() -> Any:
        async def run() -> Any:
            handle = await engine().pool.spawn()
            return {"id": handle.replica_id, "state": handle.state}
        return await guarded(run)

    @app.post("/v1/cluster/replicas/{replica_id}/drain")
    async def drain(replica_id: str) -> Any:
        async def run() -> Any:
            return {"id": replica_id, "migrated": await engine().drain(replica_id)}
        return await guarded(run)

    @app.get("/v1/cluster/requests")
    async def requests() -> Any:
        async def run() -> Any:
            e = engine()
            return {"requests": [{"id": f.request_id, "replicas": sorted(leg.replica.replica_id for leg in f.legs),
                                  "tokens": {i: len(p.token_ids) for i, p in f.progress.items()}}
                                 for f in e.flights.values()],
                    "strategies": [{"id": sid, "replicas": [rid]} for sid, rid in e.strategies.items()]}
        return await guarded(run)

    @app.post("/v1/cluster/migrate")
    async def migrate(request: Request) -> Any:
        async def run() -> Any:
            body = await request.json()
            rid = body.get("request_id") if isinstance(body, dict) else None
            if not isinstance(rid, str):
                raise ApiError(400, "missing required field request_id", param="request_id")
            target = body.get("replica")
            kv = body.get("kv")
            if kv is not None and kv not in ("blocks", "recompute"):
                raise ApiError(400, f"invalid kv {kv!r}: must be blocks or recompute", param="kv")
            return {"request_id": rid, "moved": await engine().migrate(rid, target, kv=kv)}
        return await guarded(run)


def serve_cluster(config: EngineConfig, cluster: ClusterConfig, options: ServeOptions) -> int:
    logging.basicConfig(level=options.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    app, _ = make_cluster_app(config, cluster, options)
    server = uvicorn.Server(uvicorn_config(app, options.limits, host=options.host, port=options.port,
                                           log_level=options.log_level, access_log=False,
                                           timeout_graceful_shutdown=int(options.shutdown_timeout_s)))
    previous = signal.signal(signal.SIGTERM, lambda *_: None)
    try:
        server.run()
    finally:
        signal.signal(signal.SIGTERM, previous)
    return 0
