"""AsyncEngine over the KV-checking fake runner: streams, concurrency, aborts, controllers, a dying engine."""

from __future__ import annotations

import asyncio
import contextlib
import time

import pytest

from mixserve.engine.async_engine import AsyncEngine, EngineDeadError
from mixserve.engine.engine import Engine, QueueFullError, RequestError
from mixserve.outputs import FinishReason, RequestOutput
from mixserve.sampling_params import SamplingParams
from tests.engine.fake import FakeRunner, make_engine
from tests.engine.test_engine import GREEDY, expected, prompts


@contextlib.asynccontextmanager
async def started(engine: Engine):
    ae = AsyncEngine(engine, idle_wait_s=0.05)
    ae.start()
    try:
        yield ae
    finally:
        ae.shutdown()


async def tokens_of(ae: AsyncEngine, rid: str, prompt: list[int], params: SamplingParams = GREEDY) -> list[int]:
    out: list[int] = []
    async for delta in ae.stream(rid, prompt, params):
        for o in delta.outputs:
            out.extend(o.token_ids)
    return out


class SlowRunner(FakeRunner):
    """Each step takes a few milliseconds, so a test can act while a request runs."""

    def execute(self, out):  # noqa: ANN001, ANN201
        time.sleep(0.005)
        return super().execute(out)


def slow_engine() -> Engine:
    return make_engine(runner=SlowRunner(4))


def pool_is_full(engine: Engine) -> bool:
    pool = engine.scheduler.kv.pool
    return pool.num_free_blocks == pool.num_blocks


def test_concurrent_streams_match_reference() -> None:
    async def main() -> None:
        engine = make_engine()
        async with started(engine) as ae:
            ps = prompts(1, 8)
            results = await asyncio.gather(*(tokens_of(ae, f"r{i}", p) for i, p in enumerate(ps)))
            assert results == [expected(p, GREEDY.max_tokens) for p in ps]
            await asyncio.sleep(0.1)
            assert pool_is_full(engine)
            assert ae.stats["num_running"] == 0

    asyncio.run(main())


def test_admission_errors_reach_the_caller_and_queue_nothing() -> None:
    async def main() -> None:
        engine = make_engine()
        async with started(engine) as ae:
            with pytest.raises(RequestError, match="outside the vocabulary"):
                await ae.add("bad", [10_000], GREEDY)
            assert not engine.groups
            assert await tokens_of(ae, "ok", [1, 2, 3]) == expected([1, 2, 3], GREEDY.max_tokens)

    asyncio.run(main())


def test_queue_full_is_reported() -> None:
    async def main() -> None:
        engine = make_engine()
        engine.config = engine.config.__class__(model=engine.config.model, cache=engine.config.cache,
                                                scheduler=engine.config.scheduler.__class__(max_num_waiting=0))
        async with started(engine) as ae:
            with pytest.raises(QueueFullError):
                await ae.add("r", [1, 2], GREEDY)

    asyncio.run(main())


def test_consumer_that_stops_early_aborts_and_frees_blocks() -> None:
    async def main() -> None:
        engine = slow_engine()
        async with started(engine) as ae:
            long = SamplingParams(temperature=0, max_tokens=100, ignore_eos=True)
            stream = ae.stream("r", [1, 2, 3], long)
            first = await stream.__anext__()
            assert first.outputs
            await stream.aclose()
            for _ in range(100):
                await asyncio.sleep(0.02)
                if not engine.groups and pool_is_full(engine):
                    break
            assert not engine.groups and pool_is_full(engine)

    asyncio.run(main())


def test_abort_sends_a_final_delta() -> None:
    async def main() -> None:
        engine = slow_engine()
        async with started(engine) as ae:
            queue = await ae.add("r", [4, 5], SamplingParams(temperature=0, max_tokens=100, ignore_eos=True))
            await queue.get()
            ae.abort("r")
            while True:
                item = await queue.get()
                assert isinstance(item, RequestOutput)
                if item.finished:
                    break
            assert item.outputs[0].finish_reason is FinishReason.ABORT

    asyncio.run(main())


class TwoSamples:
    """A toy controller: two greedy requests, result = both token lists."""

    def __init__(self) -> None:
        self.tokens: dict[str, list[int]] = {"c/0": [], "c/1": []}
        self.finished: set[str] = set()

    def start(self, engine: Engine) -> None:
        for rid in self.tokens:
            engine.add_request(rid, [7, 8, 9], GREEDY)

    def on_output(self, engine: Engine, out: RequestOutput) -> None:
        self.tokens[out.request_id].extend(t for o in out.outputs for t in o.token_ids)
        if out.finished:
            self.finished.add(out.request_id)

    @property
    def controller_id(self) -> str:
        return "c"

    @property
    def done(self) -> bool:
        return len(self.finished) == 2

    def cancel(self, engine: Engine) -> None:
        for rid in self.tokens:
            engine.abort_request(rid)

    def result(self) -> dict[str, list[int]]:
        return self.tokens


def test_controller_runs_beside_plain_requests() -> None:
    async def main() -> None:
        engine = make_engine()
        async with started(engine) as ae:
            result, plain = await asyncio.gather(ae.run_controller(TwoSamples()), tokens_of(ae, "p", [1, 1]))
            assert result == {"c/0": expected([7, 8, 9], 12), "c/1": expected([7, 8, 9], 12)}
            assert plain == expected([1, 1], 12)

    asyncio.run(main())


def test_engine_step_failure_marks_dead_and_fails_streams() -> None:
    async def main() -> None:
        engine = make_engine()

        def broken_step() -> list[RequestOutput]:
            raise RuntimeError("scheduler bug")

        engine.step = broken_step  # type: ignore[method-assign]
        async with started(engine) as ae:
            with pytest.raises(EngineDeadError, match="scheduler bug"):
                await tokens_of(ae, "r", [1, 2])
            assert not ae.healthy
            with pytest.raises(EngineDeadError):
                await ae.add("r2", [1], GREEDY)

    asyncio.run(main())


def test_shutdown_aborts_running_requests() -> None:
    async def main() -> None:
        engine = slow_engine()
        ae = AsyncEngine(engine, idle_wait_s=0.05)
        ae.start()
        queue = await ae.add("r", [1, 2], SamplingParams(temperature=0, max_tokens=100, ignore_eos=True))
        await queue.get()
        ae.shutdown()
        assert not engine.groups and pool_is_full(engine)

    asyncio.run(main())
