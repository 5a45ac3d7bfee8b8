"""PoolRouter under a burst of first requests to unloaded models: waiting for a model must never starve
the event loop's default executor, which the requests holding pins need (body parsing, tokenization)
to finish and release them. Before the fix 12 such requests on a 1-model budget deadlocked the server."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from mixserve.mixture.pool import LoadResult, ModelPool
from mixserve.mixture.server import PoolRouter
from mixserve.server.guards import offload


class SlowLoader:
    def __init__(self) -> None:
        self.loads: list[str] = []

    def estimate_bytes(self, name: str) -> int:
        return 100

    def load(self, name: str) -> LoadResult[Any]:
        time.sleep(0.05)
        self.loads.append(name)
        return LoadResult(name, 100)

    def unload(self, name: str, handle: Any) -> None:
        pass


def test_a_burst_of_first_requests_to_unloaded_models_all_finish() -> None:
    names = ["a", "b", "c", "d"]
    loader = SlowLoader()
    router = PoolRouter(ModelPool(names, loader, budget_bytes=100, wait_timeout_s=60), default="a")

    async def request(i: int) -> str:
        state, release = await router.route(names[i % len(names)])
        try:
            await offload(time.sleep, 0.01)  # the pinned request's own work on the default executor
            return str(state)
        finally:
            release()

    async def burst() -> list[str]:
        loop = asyncio.get_running_loop()
        loop.set_default_executor(__import__("concurrent.futures").futures.ThreadPoolExecutor(max_workers=4))
        return await asyncio.wait_for(asyncio.gather(*(request(i) for i in range(16))), timeout=60)

    done = asyncio.run(burst())
    assert sorted(done) == sorted(names[i % 4] for i in range(16))
    assert router.pool.state("a") in ("loaded", "unloaded")
