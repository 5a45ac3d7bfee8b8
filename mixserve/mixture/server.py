"""Multi-model serving: one server, many models under a pool memory budget, routed by the request's `model`.

Each pool handle is a per-model `ServerState` (its own AsyncEngine, tokenizer, limits); the app routes a
request to it through `PoolRouter.route`, which loads the model on demand (LRU eviction under the
budget) and pins it until the response (streamed or not) is done. `/v1/models` lists every model with its
state (loaded / loading / unloaded); `POST /v1/models/load` and `/v1/models/unload` take `{"model": name}`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import uvicorn
from fastapi import FastAPI
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from mixserve.mixture.models import LLMLoader, ModelSpec
from mixserve.mixture.pipeline import MixtureConfig
from mixserve.mixture.pool import LoadResult, ModelPool, PoolError
from mixserve.mixture.skills import SkillConfig
from mixserve.server.errors import ApiError
from mixserve.server.metrics import PREFIX, ServerMetrics, _EngineCollector
from mixserve.server.serving import ServerState

log = logging.getLogger("mixserve.server")


class ServerModelLoader:
    """ModelLoader whose handle is a ready `ServerState` (engine thread started); unload stops the engine."""

    def __init__(self, specs: list[ModelSpec], front: ServerState, cache_dir: str | Path | None,
                 registry: CollectorRegistry) -> None:
        self.specs = {s.name: s for s in specs}
        self.front = front
        self.cache_dir = cache_dir
        self.sizes = LLMLoader(specs, cache_dir)  # estimates (then measured sizes)
        self.registry = registry
        self.shared_metrics: ServerMetrics | None = None

    def estimate_bytes(self, name: str) -> int:
        return self.sizes.estimate_bytes(name)

    def load(self, name: str) -> LoadResult[ServerState]:
        from mixserve.builder import load_model, wire_engine
        from mixserve.engine.async_engine import AsyncEngine
        from mixserve.mixture.models import tensor_bytes
        from mixserve.server.params import Limits

        spec = self.specs[name]
        config = spec.engine_config()
        loaded = load_model(config, cache_dir=self.cache_dir)
        built = wire_engine(loaded, config)
        engine = AsyncEngine(built.engine)
        engine.start()
        state = ServerState(model_name=name, reject_unknown_fields=self.front.reject_unknown_fields,
                            request_limits=self.front.request_limits)
        state.tokenizer = built.tokenizer
        state.limits = Limits(max_model_len=built.engine.info.max_model_len,
                              vocab_size=built.engine.info.vocab_size, max_num_seqs=config.scheduler.max_num_seqs)
        state.model_path = str(built.checkpoint.path)
        state.metrics = self._metrics(name)
        state.engine = engine
        nbytes = tensor_bytes(built.model, [built.runner.kv_caches])
        self.sizes.measured[name] = nbytes
        return LoadResult(state, nbytes)

    def _metrics(self, name: str) -> ServerMetrics:
        """Request histograms live once in the shared registry (label `model_name`); each model gets a view."""
        if self.shared_metrics is None:
            self.shared_metrics = ServerMetrics(name, stats=dict, registry=self.registry, engine_collector=False)
            return self.shared_metrics
        return self.shared_metrics.view(name)

    def unload(self, name: str, handle: ServerState) -> None:
        if handle.engine is not None:
            handle.engine.shutdown()
        handle.engine = None
        import gc

        gc.collect()


POOL_WAITERS = 256
"""Threads that may wait in `ModelPool.acquire` at once (waiting for room or another caller's load)."""


class PoolRouter:
    """Request `model` -> a pinned per-model ServerState, and the model-management routes' logic.

    Acquires block (a load, or waiting for room until pinned models are released). They run on the
    router's own executor, never the event loop's default one: the requests that hold pins need the
    default executor (body parsing, tokenization) to finish and release them, and a burst of first
    requests to unloaded models would otherwise fill it with waiters and deadlock the server."""

    def __init__(self, pool: ModelPool[ServerState], default: str, mixtures: dict[str, Any] | None = None) -> None:
        self.executor = ThreadPoolExecutor(max_workers=POOL_WAITERS, thread_name_prefix="mixserve-pool")
        self.pool = pool
        self.default = default
        self.mixtures: dict[str, Any] = mixtures or {}
        """`mixture/<name>` -> ServedMixture."""

    def mixture(self, name: str | None) -> Any:
        """The ServedMixture a request names, or None for a plain model."""
        return self.mixtures.get(name) if name else None

    def _check(self, name: str | None) -> str:
        name = name or self.default
        if name not in self.pool.names:
            known = ", ".join([*self.pool.names, *self.mixtures])
            raise ApiError(404, f"the model {name!r} does not exist; known models: {known}",
                           param="model", code="model_not_found")
        return name

    async def route(self, name: str | None) -> tuple[ServerState, Callable[[], None]]:
        name = self._check(name)
        try:
            state = await self._blocking(self.pool.acquire, name)
        except PoolError as exc:
            status = 404 if exc.code == "model_not_found" else 503
            raise ApiError(status, str(exc), param="model", code=exc.code) from exc
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                self.pool.release(name)
        return state, release

    async def _blocking(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)

    async def load(self, name: str | None) -> dict[str, Any]:
        state, release = await self.route(name)
        release()
        return {"model": state.model_name, "status": "loaded"}

    async def unload(self, name: str | None) -> dict[str, Any]:
        name = self._check(name)
        if self.pool.state(name) == "unloaded":
            return {"model": name, "status": "unloaded"}
        if not await self._blocking(self.pool.unload, name):
            raise ApiError(409, f"model {name!r} is in use or loading; retry when its requests finish",
                           param="model", code="model_busy")
        return {"model": name, "status": "unloaded"}

    def models(self, created: int) -> list[dict[str, Any]]:
        out = []
        for name in self.pool.names:
            stats = self.pool.stats(name)
            out.append({"id": name, "object": "model", "created": created, "owned_by": "mixserve",
                        "root": self.pool.loader.specs[name].model, "parent": None,  # type: ignore[attr-defined]
                        "status": self.pool.state(name), "loads": stats.loads, "last_error": stats.last_error})
        for name, served in self.mixtures.items():
            out.append({"id": name, "object": "model", "created": created, "owned_by": "mixserve", "root": name,
                        "parent": None, "status": "ready", "experts": served.profiles.models})
        return out


class PoolCollector(Collector):
    """Engine gauges/counters of every loaded model (one family, one sample per model) + pool gauges."""

    def __init__(self, pool: ModelPool[ServerState]) -> None:
        self.pool = pool

    def collect(self) -> Iterator[Metric]:
        families: dict[str, Metric] = {}
        for name in self.pool.names:
            state = self.pool.peek(name)
            if state is None or state.engine is None:
                continue
            stats: Callable[[], dict[str, float]] = lambda e=state.engine: e.stats  # type: ignore[misc]
            for fam in _EngineCollector(name, stats, dict).collect():
                if fam.name in families:
                    families[fam.name].samples.extend(fam.samples)
                else:
                    families[fam.name] = fam
        yield from families.values()
        totals = self.pool.totals()
        for key, doc in (("resident_bytes", "Bytes of loaded models."), ("budget_bytes", "Pool memory budget."),
                         ("loaded_models", "Models resident now.")):
            yield GaugeMetricFamily(PREFIX + "pool_" + key, doc, value=totals[key])
        for key, doc in (("loads", "Model loads."), ("evictions", "Models evicted for room."),
                         ("bytes_loaded", "Bytes loaded.")):
            yield CounterMetricFamily(PREFIX + "pool_" + key, doc, value=totals[key])
        loaded = GaugeMetricFamily(PREFIX + "model_loaded", "1 when the model is resident.", labels=["model_name"])
        for name in self.pool.names:
            loaded.add_metric([name], float(self.pool.state(name) == "loaded"))
        yield loaded


def make_pool_app(specs: list[ModelSpec], budget_bytes: int, front: ServerState, cache_dir: str | None,
                  preload: list[str], mixtures: dict[str, str] | None = None,
                  mixture_max_tokens: int = 128, mixture_temperature: float = 0.7,
                  mixture_config: MixtureConfig | None = None, mixture_skills: SkillConfig | None = None
                  ) -> tuple[FastAPI, ServerState, PoolRouter]:
    """The app of a pool server; `mixtures` maps a mixture name to its profiles JSON (served as
    `mixture/<name>`), answered with `mixture_config` (default: the paper's) and its experts sampled at
    `mixture_temperature`."""
    from mixserve.config import ConfigError
    from mixserve.mixture.profiles import Profiles
    from mixserve.mixture.served import ServedMixture
    from mixserve.sampling_params import SamplingParams
    from mixserve.server.app import build_app

    registry = CollectorRegistry()
    loader = ServerModelLoader(specs, front, cache_dir, registry)
    pool: ModelPool[ServerState] = ModelPool([s.name for s in specs], loader, budget_bytes)
    served = {}
    for name, path in (mixtures or {}).items():
        profiles = Profiles.load(path)
        missing = [m for m in profiles.models if m not in pool.names]
        if missing:
            raise ConfigError(f"invalid --mixture {name}={path}: its profiles name models this server does not "
                              f"have: {missing} (served: {pool.names})", field="mixture")
        mixture = ServedMixture(name, profiles, pool, SamplingParams(max_tokens=mixture_max_tokens,
                                                                     temperature=mixture_temperature),
                                config=mixture_config, skills=mixture_skills)
        served[mixture.name] = mixture
    router = PoolRouter(pool, specs[0].name, served)
    registry.register(PoolCollector(pool))
    front.router = router
    front.render_metrics = lambda: generate_latest(registry)

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        def warm() -> None:
            for name in preload:
                try:
                    pool.load(name)
                except PoolError as exc:
                    log.error("%s", exc)
        threading.Thread(target=warm, name="mixserve-preload", daemon=True).start()
        try:
            yield
        finally:
            for name in pool.names:
                state = pool.peek(name)
                if state is not None and state.engine is not None:
                    state.engine.shutdown()

    return build_app(front, lifespan=lifespan), front, router


def serve_pool(specs: list[ModelSpec], budget_bytes: int, options: Any, preload: list[str],
               mixtures: dict[str, str] | None = None, mixture_max_tokens: int = 128,
               mixture_temperature: float = 0.7, mixture_config: MixtureConfig | None = None,
               mixture_skills: SkillConfig | None = None) -> int:
    from mixserve.server.http import uvicorn_config

    logging.basicConfig(level=options.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    front = ServerState(model_name=specs[0].name, reject_unknown_fields=options.reject_unknown_fields,
                        request_limits=options.limits)
    app, _, _ = make_pool_app(specs, budget_bytes, front, options.cache_dir, preload, mixtures,
                              mixture_max_tokens, mixture_temperature, mixture_config, mixture_skills)
    server = uvicorn.Server(uvicorn_config(app, options.limits, host=options.host, port=options.port,
                                           log_level=options.log_level, access_log=False,
                                           timeout_graceful_shutdown=int(options.shutdown_timeout_s)))
    previous: dict[int, Any] = {sig: signal.signal(sig, lambda *_: None) for sig in (signal.SIGTERM,)}
    try:
        server.run()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0
