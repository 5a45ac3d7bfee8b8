"""The cloud side inside `mixserve serve` (`--cloud-split-layer K`): one server process answers ordinary
OpenAI requests AND edge sessions, over the same loaded weights.

Edges connect to `ws://HOST:PORT/v1/edge/ws` and speak the frame protocol of `mixserve cloud` (the same
`CloudService`: its context manager holds layers `[K, L)` with per-session KV caches of its own, separate
from the engine's KV pool and bounded by its own memory budget). Frames are handled off the event loop,
one at a time across connections (the context manager is not thread-safe); the engine thread keeps
stepping meanwhile (both only read the weights).
"""

from __future__ import annotations

import asyncio
import threading
from typing import Any

from fastapi import FastAPI, WebSocket, WebSocketDisconnect

EDGE_WS_PATH = "/v1/edge/ws"


def build_cloud_service(loaded: Any, split_layer: int, session_ttl_s: float = 600.0,
                        memory_budget_bytes: int = 1 << 30) -> Any:
    """A `CloudService` for layers `[split_layer, L)` of an already loaded model (`builder.LoadedModel`)."""
    from mixserve.edge.cloud import CloudContextManager, CloudService
    from mixserve.edge.config import CloudConfig
    from mixserve.edge.frames import model_key
    from mixserve.models.base import as_causal_lm

    hf_config = loaded.checkpoint.hf_config
    config = CloudConfig(split_layer=split_layer, session_ttl_s=session_ttl_s, memory_budget_bytes=memory_budget_bytes)
    manager = CloudContextManager(as_causal_lm(loaded.model), config, loaded.dtype)
    return CloudService(manager, model_key(hf_config, split_layer), int(hf_config["hidden_size"]),
                        tuple(loaded.checkpoint.tokenizer.eos_token_ids))


def install_cloud_route(app: FastAPI, state: Any) -> None:
    """Add the edge WebSocket route; it serves `state.cloud` (a `CloudService`, set once the model loaded)."""
    lock = threading.Lock()

    def handle(service: Any, data: bytes) -> list[bytes]:
        with lock:
            return list(service.handle(data))

    @app.websocket(EDGE_WS_PATH)
    async def edge_session(ws: WebSocket) -> None:
        await ws.accept()
        service = state.cloud
        if service is None:
            await ws.close(code=1013, reason="the model is still loading")  # try again later
            return
        try:
            while True:
                message = await ws.receive()
                if message["type"] == "websocket.disconnect":
                    return
                data = message.get("bytes")
                if data is None:
                    await ws.close(code=1003, reason="binary frames only")
                    return
                for reply in await asyncio.to_thread(handle, service, data):
                    await ws.send_bytes(reply)
        except WebSocketDisconnect:
            return
