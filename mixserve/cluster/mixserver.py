"""`mixserve serve --ray --mixture NAME=PROFILES --models-file F`: mixtures served from pool replicas.

The OpenAI server answers `mixture/NAME` (chat or completions, streamed or not) exactly as the
single-process pool server does (`mixture/served.py`: concurrent questions within a window run as one
batch), but the experts live on pool replicas (`cluster/mixture.py`): each replica holds its own model pool
under `--pool-memory-budget` (per replica), each model's group of a batch goes to the replica holding it,
and each model loads once per batch across the cluster. Plain expert models are not served on their own
here (400 naming the mixtures). `GET /v1/cluster/replicas` and `/metrics` report each replica's
loads, evictions, bytes loaded, resident bytes and loaded models.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import AsyncIterator, Iterator
from typing import Any

import uvicorn
from fastapi import FastAPI
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from mixserve.cluster.config import ClusterConfig
from mixserve.config import ConfigError
from mixserve.mixture.models import ModelSpec
from mixserve.sampling_params import SamplingParams
from mixserve.server.errors import ApiError, as_api_error, error_response
from mixserve.server.launch import ServeOptions
from mixserve.server.metrics import PREFIX
from mixserve.server.serving import ServerState

log = logging.getLogger("mixserve.cluster")


class ClusterMixtureRouter:
    """`ServerState.router` of the mixture cluster server: `mixture/NAME` -> its ServedMixture."""

    def __init__(self, experts: list[str], mixtures: dict[str, Any]) -> None:
        self.experts = experts
        self.mixtures = mixtures
        self.pool: Any = None
        """The started `ClusterModelPool`."""

    def mixture(self, name: str | None) -> Any:
        served = self.mixtures.get(name) if name else None
        if served is None and name in self.experts:
            raise ApiError(400, f"invalid field model: {name!r} is an expert of the cluster's mixtures, not served "
                                f"on its own; ask for one of {', '.join(self.mixtures)}", param="model")
        return served

    async def route(self, name: str | None) -> Any:
        raise ApiError(404, f"the model {name!r} does not exist; known models: {', '.join(self.mixtures)}",
                       param="model", code="model_not_found")

    async def load(self, name: str | None) -> Any:
        raise ApiError(400, "the cluster places expert models itself (no load/unload)", param="model")

    unload = load

    def models(self, created: int) -> list[dict[str, Any]]:
        return [{"id": name, "object": "model", "created": created, "owned_by": "mixserve", "root": name,
                 "parent": None, "status": "ready", "experts": served.profiles.models}
                for name, served in self.mixtures.items()]


class PoolReplicasCollector(Collector):
    """Per replica: resident/budget bytes, loaded models, loads, evictions, bytes loaded (`replica` label)."""

    def __init__(self, router: ClusterMixtureRouter) -> None:
        self.router = router

    def collect(self) -> Iterator[Metric]:
        replicas = self.router.pool.replicas() if self.router.pool is not None else []
        for key, name, doc in (("resident_bytes", "pool_resident_bytes", "Bytes of the replica's loaded models."),
                               ("budget_bytes", "pool_budget_bytes", "The replica's pool memory budget.")):
            g = GaugeMetricFamily(PREFIX + "cluster_" + name, doc, labels=["replica"])
            for r in replicas:
                g.add_metric([r["id"]], float(r[key]))
            yield g
        for key, name, doc in (("loads", "pool_loads", "Models loaded on the replica."),
                               ("evictions", "pool_evictions", "Models evicted on the replica."),
                               ("bytes_loaded", "pool_bytes_loaded", "Bytes of models loaded on the replica.")):
            c = CounterMetricFamily(PREFIX + "cluster_" + name, doc, labels=["replica"])
            for r in replicas:
                c.add_metric([r["id"]], float(r[key]))
            yield c
        g = GaugeMetricFamily(PREFIX + "cluster_pool_model_loaded", "1 when the model is loaded on the replica.",
                              labels=["replica", "model"])
        for r in replicas:
            for model in r["loaded"]:
                g.add_metric([r["id"], model], 1.0)
        yield g


def make_mixture_cluster_app(specs: list[ModelSpec], mixtures: dict[str, str], budget_bytes: int,
                             cluster: ClusterConfig, options: ServeOptions, max_tokens: int = 128
                             ) -> tuple[FastAPI, ServerState]:
    from mixserve.cluster.launch import start_ray
    from mixserve.cluster.mixture import ClusterModelPool
    from mixserve.mixture.profiles import Profiles
    from mixserve.mixture.served import ServedMixture
    from mixserve.server.app import build_app

    names = [s.name for s in specs]
    params = SamplingParams(max_tokens=max_tokens, temperature=0.7)  # as the single-process pool server
    served: dict[str, Any] = {}
    for name, path in mixtures.items():
        profiles = Profiles.load(path)
        missing = [m for m in profiles.models if m not in names]
        if missing:
            raise ConfigError(f"invalid --mixture {name}={path}: its profiles name models this server does not "
                              f"have: {missing} (served: {names})", field="mixture")
        mixture = ServedMixture(name, profiles, None, params)  # type: ignore[arg-type]  # pool set at start
        served[mixture.name] = mixture
    front = ServerState(model_name=next(iter(served)), reject_unknown_fields=options.reject_unknown_fields,
                        request_limits=options.limits)
    router = ClusterMixtureRouter(names, served)
    registry = CollectorRegistry()
    registry.register(PoolReplicasCollector(router))
    holder: dict[str, Any] = {}

    def start() -> None:
        holder["started_ray"] = start_ray(cluster)
        pool = ClusterModelPool.start(specs, cluster.replicas, budget_bytes, params, options.cache_dir,
                                      cluster.threads_per_replica, timeout_s=cluster.start_timeout_s)
        holder["pool"] = router.pool = pool
        for mixture in served.values():
            mixture.pool, mixture.expert_of, mixture.executor = pool, pool.expert_of, pool.run_grouped

    async def load() -> None:
        try:
            await asyncio.to_thread(start)
            front.render_metrics = lambda: generate_latest(registry)
            front.router = router  # /health answers 503 (loading) until here
            log.info("mixture cluster of %d pool replicas ready", cluster.replicas)
        except Exception as exc:  # noqa: BLE001 - reported by /health and every route
            log.error("cluster start failed: %s", exc)
            front.load_error = f"{type(exc).__name__}: {exc}"

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        task = asyncio.ensure_future(load())
        try:
            yield
        finally:
            task.cancel()
            if "pool" in holder:
                holder["pool"].close()
            if holder.get("started_ray"):
                import ray

                await asyncio.to_thread(ray.shutdown)

    app = build_app(front, lifespan=lifespan)

    @app.get("/v1/cluster/replicas")
    async def replicas() -> Any:
        if router.pool is None:
            return error_response(as_api_error(ApiError(503, "the cluster is still starting", code="loading")))
        pool = router.pool
        return {"replicas": pool.replicas(), "placement": {m: pool.holder(m) for m in pool.names},
                "deaths": pool.num_deaths}

    return app, front


def serve_mixture_cluster(specs: list[ModelSpec], mixtures: dict[str, str], budget_bytes: int,
                          cluster: ClusterConfig, options: ServeOptions) -> int:
    from mixserve.server.http import uvicorn_config

    logging.basicConfig(level=options.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    app, _ = make_mixture_cluster_app(specs, mixtures, budget_bytes, cluster, options)
    server = uvicorn.Server(uvicorn_config(app, options.limits, host=options.host, port=options.port,
                                           log_level=options.log_level, access_log=False,
                                           timeout_graceful_shutdown=int(options.shutdown_timeout_s)))
    previous = signal.signal(signal.SIGTERM, lambda *_: None)
    try:
        server.run()
    finally:
        signal.signal(signal.SIGTERM, previous)
    return 0
