"""The edge's OpenAI-compatible HTTP API: `mixserve serve`'s own app (`mixserve.server`: request bodies,
validation, response formats, streaming, errors, /v1/models, /health, /metrics, /tokenize) over an
`EdgeEngine` instead of the engine, so a client cannot tell it talks to a split model except through
`usage`: `edge_tokens`, `cloud_tokens`, `standalone_tokens`, `deferred_tokens`, `link_bytes_sent`,
`link_bytes_received`. /metrics adds the edge's counters (`mixserve_edge_*`) to the server's, and
/edge/health says whether the cloud link is up.

Refused with a 400 naming the field: structured output (`response_format`, `guided_*`,
`structured_outputs`, `tool_choice` that forces a call) and echo with logprobs (prompt logprobs), plus
what `mixserve serve` itself refuses (`suffix`, `best_of` other than n, `strategy`: no scaling hook here).
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI

from mixserve.edge.api import EdgeLLM
from mixserve.edge.engine import EdgeEngine
from mixserve.server.app import build_app
from mixserve.server.limits import RequestLimits
from mixserve.server.metrics import ServerMetrics
from mixserve.server.params import Limits
from mixserve.server.serving import ServerState

MAX_NUM_SEQS = 64
"""Most samples (prompts x n) one request may ask for; they run one after another."""


def build_edge_app(llm: EdgeLLM, model_name: str, reject_unknown_fields: bool = False,
                   request_limits: RequestLimits | None = None) -> FastAPI:
    """The app over one `EdgeLLM` (its worker thread starts now and stops with the app's lifespan)."""
    engine = EdgeEngine(llm)
    engine.start()
    vocab_size = int(llm.loaded.checkpoint.hf_config["vocab_size"])
    state = ServerState(model_name=model_name, engine=engine, tokenizer=llm.tokenizer,  # type: ignore[arg-type]
                        limits=Limits(max_model_len=llm.config.max_len, vocab_size=vocab_size,
                                      max_num_seqs=MAX_NUM_SEQS),
                        model_path=str(llm.loaded.checkpoint.path), reject_unknown_fields=reject_unknown_fields,
                        request_limits=request_limits or RequestLimits(), usage_extra=engine.usage_extra)
    metrics = ServerMetrics(model_name, stats=lambda: engine.stats)
    engine.listeners.append(metrics.prompt_tokens.observe)
    state.metrics = metrics
    state.render_metrics = lambda: metrics.render() + metrics_text(llm).encode()

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        try:
            yield
        finally:
            engine.shutdown()

    app = build_app(state, lifespan=lifespan)

    @app.get("/edge/health")
    async def edge_health() -> Any:
        return {"status": "ok" if engine.healthy else "error", "cloud_connected": llm.runner.link.is_up,
                "split_layer": llm.config.split_layer, "exit_threshold": llm.config.exit_threshold}

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
