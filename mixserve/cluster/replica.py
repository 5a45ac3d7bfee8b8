"""`EngineReplica`: one whole engine in one process; the ingress runs it as a Ray actor (see `pool`).

A plain class (Ray wraps it with `ray.remote` lazily), so it is importable and testable without Ray.
`generate` is an async generator (a Ray streaming method): first one `Admission` (accepted, or the
engine's rejection with its error class and message, so the ingress raises the same 400/429), then
lists of the request's deltas, each list holding whatever arrived since the last one (one Ray object per
engine step at most, not per token). A consumer that stops early aborts the request.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mixserve.config import EngineConfig
from mixserve.engine.async_engine import AsyncEngine, EngineDeadError
from mixserve.engine.engine import QueueFullError, RequestError, ResumePoint
from mixserve.outputs import RequestOutput
from mixserve.sampling_params import SamplingParams

log = logging.getLogger("mixserve.cluster")


@dataclass(frozen=True)
class ReplicaInfo:
    """What the ingress learns from a replica once its model is loaded."""

    replica_id: str
    model_path: str
    max_model_len: int
    vocab_size: int
    max_num_seqs: int
    block_size: int
    pid: int
    host: str
    load_seconds: float


@dataclass(frozen=True)
class Admission:
    """The first item of every `generate` stream."""

    error_kind: str | None = None
    """None: accepted; else `RequestError`, `QueueFullError` or `EngineDeadError`."""
    message: str = ""


ERRORS: dict[str, type[Exception]] = {"RequestError": RequestError, "QueueFullError": QueueFullError,
                                      "EngineDeadError": EngineDeadError}


class EngineReplica:
    """Loads the model of `config` and serves requests from the ingress."""

    def __init__(self, replica_id: str, config: EngineConfig, cache_dir: str | None = None) -> None:
        from mixserve.builder import build_engine  # torch: only inside the replica

        built = build_engine(config, cache_dir=Path(cache_dir) if cache_dir else None)
        from mixserve.scaling import ModelCost

        self.engine = AsyncEngine(built.engine)
        self.engine.start()
        self.tokenizer = built.checkpoint.tokenizer
        self.cost = ModelCost.from_model(built.checkpoint.hf_config, built.model)
        self._scales: dict[str, asyncio.Task[Any]] = {}
        self.info = ReplicaInfo(replica_id=replica_id, model_path=str(built.checkpoint.path),
                                max_model_len=built.engine.info.max_model_len,
                                vocab_size=built.engine.info.vocab_size,
                                max_num_seqs=config.scheduler.max_num_seqs, block_size=config.cache.block_size,
                                pid=os.getpid(), host=socket.gethostname(), load_seconds=built.load_seconds)

    def describe(self) -> ReplicaInfo:
        return self.info

    def stats(self) -> dict[str, float]:
        """The engine's counters and gauges (snapshot of the last step); raises if the engine died."""
        if not self.engine.healthy:
            raise EngineDeadError(self.engine.error or "the engine is not running")
        return dict(self.engine.stats)

    async def export_kv(self, request_id: str, samples: list[int]) -> Any:
        """Export the full KV blocks of `samples` (replica sample indexes) of a running request and abort it,
        in one engine command (nothing is generated in between): a `KVExport` or None per sample (one
        Ray return each: call with `num_returns=len(samples)`); never raises."""
        def run(engine: Any) -> list[Any]:
            exports = []
            for sample in samples:
                try:
                    exports.append(engine.export_kv(request_id, sample))
                except Exception as exc:  # noqa: BLE001 - not live any more: the target recomputes
                    log.info("no KV export of %s sample %d: %s", request_id, sample, exc)
                    exports.append(None)
            self.engine.dispatcher.abort(request_id)
            return exports

        try:
            exports = await asyncio.wrap_future(self.engine.call(run))
        except Exception as exc:  # noqa: BLE001 - a dead engine: nothing to move
            log.warning("KV export of %s failed: %s", request_id, exc)
            self.engine.abort(request_id)
            exports = [None] * len(samples)
        return exports[0] if len(samples) == 1 else exports

    async def _import_kv(self, kv: list[Any]) -> int:
        """Fetch a `KVExport` (an ObjectRef from another replica's `export_kv`) and import it; 0 if none."""
        try:
            export = await kv[0]
            if export is None:
                return 0
            return int(await asyncio.wrap_future(self.engine.call(lambda engine: engine.import_kv(export))))
        except Exception as exc:  # noqa: BLE001 - the source died or the import failed: recompute
            log.warning("KV import failed, the resume recomputes: %s", exc)
            return 0

    async def generate(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                       prompt: str | None = None, resume: ResumePoint | None = None, kv: list[Any] | None = None
                       ) -> AsyncIterator[Admission | list[RequestOutput]]:
        """`kv`: `[ObjectRef of a KVExport]` of a migrated sample, imported before it is admitted (a list, so
        that Ray hands the reference over and this replica fetches it from the source's object store)."""
        if kv and resume is not None:
            await self._import_kv(kv)
        try:
            queue = await self.engine.add(request_id, prompt_token_ids, params, prompt, resume=resume)
        except (RequestError, QueueFullError, EngineDeadError) as exc:
            yield Admission(type(exc).__name__, str(exc))
            return
        yield Admission()
        finished = False
        try:
            while not finished:
                batch = [await queue.get()]
                while not queue.empty():
                    batch.append(queue.get_nowait())
                outputs: list[RequestOutput] = []
                for item in batch:
                    if isinstance(item, BaseException):
                        yield outputs
                        yield Admission("EngineDeadError", str(item))
                        return
                    outputs.append(item)
                    finished = finished or item.finished
                yield outputs
        finally:
            if not finished:
                self.engine.abort(request_id)

    async def scale(self, spec: Any, events: bool) -> AsyncIterator[Any]:
        """Run a strategy (`cluster.scaling.ScaleSpec`) on this engine: an `Admission`, then lists of its
        progress events (when `events`), then its `ScaleResult` (or an `Admission` with the error)."""
        from mixserve.scaling.progress import ProgressController

        try:
            strategy = spec.build(self.tokenizer, self.cost)
        except Exception as exc:  # noqa: BLE001 - the ingress validated it: unexpected, reported
            yield Admission("RequestError", str(exc))
            return
        yield Admission()
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue()

        def emit(event: dict[str, Any]) -> None:  # on the engine thread
            loop.call_soon_threadsafe(queue.put_nowait, event)

        controller = ProgressController(strategy, emit) if events else strategy
        task = asyncio.ensure_future(self.engine.run_controller(controller))
        self._scales[spec.strategy_id] = task
        try:
            while not task.done():
                getter = asyncio.ensure_future(queue.get())
                await asyncio.wait({getter, task}, return_when=asyncio.FIRST_COMPLETED)
                if not getter.done():
                    getter.cancel()
                    continue
                batch = [getter.result()]
                while not queue.empty():
                    batch.append(queue.get_nowait())
                yield batch
            await asyncio.sleep(0)  # events emitted just before the end arrive through call_soon
            if not queue.empty():
                yield [queue.get_nowait() for _ in range(queue.qsize())]
            if task.cancelled():
                yield Admission("RequestError", "the strategy was aborted")
                return
            error = task.exception()
            if error is not None:
                kind = type(error).__name__
                yield Admission(kind if kind in ERRORS else "StrategyFailed", str(error))
                return
            yield task.result()
        finally:
            self._scales.pop(spec.strategy_id, None)
            if not task.done():
                task.cancel()

    def abort_scale(self, strategy_id: str) -> None:
        task = self._scales.get(strategy_id)
        if task is not None:
            task.cancel()

    def abort(self, request_id: str) -> None:
        self.engine.abort(request_id)

    def shutdown(self) -> None:
        self.engine.shutdown()


