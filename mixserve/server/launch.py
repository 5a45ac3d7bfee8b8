"""`mixserve serve`: listen at once, load the model in the background (503 until ready), stop gracefully.

SIGTERM (and Ctrl-C) stop accepting connections, let in-flight requests finish for up to
`shutdown_timeout_s`, then abort what is left, stop the engine thread and return 0.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import uvicorn
from fastapi import FastAPI

from mixserve.config import EngineConfig
from mixserve.engine.async_engine import AsyncEngine
from mixserve.scaling import ModelCost
from mixserve.server.app import build_app
from mixserve.server.http import uvicorn_config
from mixserve.server.limits import RequestLimits
from mixserve.server.metrics import ServerMetrics
from mixserve.server.params import Limits
from mixserve.server.scaling import make_scaling_hook
from mixserve.server.serving import ServerState

log = logging.getLogger("mixserve.server")


@dataclass(frozen=True)
class ServeOptions:
    """Server-side settings of `mixserve serve` (the engine's are in EngineConfig)."""

    host: str = "127.0.0.1"
    port: int = 8000
    served_model_name: str | None = None
    """Name clients send as `model`; default: the --model argument."""
    shutdown_timeout_s: float = 30.0
    """How long in-flight requests may run after SIGTERM before they are aborted."""
    reject_unknown_fields: bool = False
    """400 on request fields this server does not know (default: ignore them, as vLLM does)."""
    cache_dir: str | None = None
    log_level: str = "info"
    limits: RequestLimits = field(default_factory=RequestLimits)
    """Body size, JSON depth, string length and connection timeouts (see `RequestLimits`)."""
    cloud_split_layer: int | None = None
    """Also serve edge sessions of a split model (layers [K, L)) on ws://HOST:PORT/v1/edge/ws (see
    `mixserve.edge.cloud_route`); None: no cloud routes."""


def load_into(state: ServerState, config: EngineConfig, cache_dir: str | Path | None,
              cloud_split_layer: int | None = None) -> None:
    """Build the engine for `config` (and the edge cloud service over the same weights when
    `cloud_split_layer` is set) and publish it on `state` (run in a background thread)."""
    from mixserve.builder import load_model, wire_engine  # torch: only in the loader thread

    try:
        loaded = load_model(config, cache_dir=cache_dir)
        built = wire_engine(loaded, config)
        if cloud_split_layer is not None:
            from mixserve.edge.cloud_route import build_cloud_service

            state.cloud = build_cloud_service(loaded, cloud_split_layer)
    except Exception as exc:  # noqa: BLE001 - reported by /health and every route
        log.error("model load failed: %s", exc)
        state.load_error = f"{type(exc).__name__}: {exc}"
        return
    engine = AsyncEngine(built.engine)
    engine.start()
    state.tokenizer = built.tokenizer
    state.limits = Limits(max_model_len=built.engine.info.max_model_len, vocab_size=built.engine.info.vocab_size,
                          max_num_seqs=config.scheduler.max_num_seqs)
    state.model_path = str(built.checkpoint.path)
    state.metrics = ServerMetrics(state.model_name, stats=lambda: engine.stats,
                                  extra=loaded.expert_stats,  # keys already start with expert_
                                  block_size=config.cache.block_size)
    engine.listeners.append(state.metrics.prompt_tokens.observe)
    state.scaling = make_scaling_hook(ModelCost.from_model(built.checkpoint.hf_config, built.model))
    state.engine = engine
    log.info("model %s ready (%.1fs)", state.model_name, built.load_seconds)


def make_app(config: EngineConfig, options: ServeOptions) -> tuple[FastAPI, ServerState]:
    state = ServerState(model_name=options.served_model_name or config.model.model,
                        reject_unknown_fields=options.reject_unknown_fields, request_limits=options.limits)

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        loader = threading.Thread(target=load_into, args=(state, config, options.cache_dir,
                                                          options.cloud_split_layer),
                                  name="mixserve-load", daemon=True)
        loader.start()
        try:
            yield
        finally:
            if state.engine is not None:
                state.engine.shutdown()

    app = build_app(state, lifespan=lifespan)
    if options.cloud_split_layer is not None:
        from mixserve.edge.cloud_route import install_cloud_route

        install_cloud_route(app, state)
    return app, state


def serve(config: EngineConfig, options: ServeOptions) -> int:
    logging.basicConfig(level=options.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    app, _ = make_app(config, options)
    server = uvicorn.Server(uvicorn_config(app, options.limits, host=options.host, port=options.port,
                                           log_level=options.log_level, access_log=False,
                                           timeout_graceful_shutdown=int(options.shutdown_timeout_s)))
    # uvicorn re-raises the signal it handled once it has shut down; a no-op handler makes that a clean exit 0.
    previous: dict[int, Any] = {sig: signal.signal(sig, lambda *_: None) for sig in (signal.SIGTERM,)}
    try:
        server.run()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0
