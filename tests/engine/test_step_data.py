"""The scheduler hands the runner plain data: a SchedulerOutput survives a pickle round trip."""

from __future__ import annotations

import pickle

from mixserve.engine.engine import RunnerOutput
from mixserve.engine.scheduler import SchedulerOutput
from mixserve.sampling_params import SamplingParams
from tests.engine.fake import FakeRunner, make_engine, run_all


class PicklingRunner(FakeRunner):
    """Executes a copy of each step that went through pickle (as a runner in another process would)."""

    def execute(self, out: SchedulerOutput) -> RunnerOutput:
        copy = pickle.loads(pickle.dumps(out))
        assert copy == out
        return super().execute(copy)


def _run(runner: FakeRunner) -> dict[str, dict[int, list[int]]]:
    engine = make_engine(runner=runner)
    engine.add_request("greedy", [1, 2, 3, 4, 5], SamplingParams(max_tokens=6, temperature=0))
    engine.add_request("seeded", [7, 8, 9], SamplingParams(n=3, max_tokens=5, temperature=1.0, seed=3))
    engine.add_request("min", [4, 4], SamplingParams(max_tokens=4, min_tokens=2, temperature=0))
    return run_all(engine)


def test_scheduler_output_pickles_and_runner_gives_same_result() -> None:
    assert _run(PicklingRunner(4)) == _run(FakeRunner(4))


def test_sampling_spec_carries_seed_and_suppression() -> None:
    engine = make_engine()
    engine.add_request("r", [1, 2], SamplingParams(n=2, max_tokens=3, min_tokens=2, seed=5,
                                                   stop_token_ids=[9]))
    seen = {}
    for _ in range(10):
        out = engine.scheduler.schedule()
        for seq in out.seqs:
            if seq.sample:
                seen.setdefault(seq.request_id, seq.spec)
        engine.scheduler.update(out)
        engine._fork_ready()
        if len(seen) == 2:
            break
    assert seen["r#0"].seed == 5 and seen["r#1"].seed not in (None, 5)
    assert seen["r#0"].suppress_token_ids == (9, 0)  # stop id, then EOS, until min_tokens
