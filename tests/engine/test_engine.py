"""Engine invariants over the KV-checking fake runner (pure Python, milliseconds)."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mixserve.engine.engine import QueueFullError, RequestError
from mixserve.outputs import FinishReason
from mixserve.sampling_params import SamplingParams
from tests.engine.fake import EOS, VOCAB, FakeRunner, make_engine, next_token, run_all

GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)


def expected(prompt: list[int], n: int) -> list[int]:
    ctx = list(prompt)
    for _ in range(n):
        ctx.append(next_token(ctx))
    return ctx[len(prompt):]


def prompts(seed: int, count: int, shared: list[int] | None = None) -> list[list[int]]:
    rng = random.Random(seed)
    return [(shared or []) + [rng.randrange(1, VOCAB) for _ in range(rng.randrange(1, 30))]
            for _ in range(count)]


def run(engine, ps, params=GREEDY):
    for i, p in enumerate(ps):
        engine.add_request(f"r{i}", p, params)
    return run_all(engine)


def assert_pool_full(engine) -> None:
    pool = engine.scheduler.kv.pool
    assert pool.num_free_blocks == pool.num_blocks
    assert all(c == 0 for c in pool.ref_counts)
    assert not engine.scheduler.kv.block_tables


def test_single_request_matches_reference() -> None:
    engine = make_engine()
    out = run(engine, [[5, 6, 7]])
    assert out["r0"][0] == expected([5, 6, 7], 12)
    assert_pool_full(engine)


def test_batched_equals_one_at_a_time() -> None:
    ps = prompts(1, 10)
    batched = run(make_engine(), ps)
    for i, p in enumerate(ps):
        assert batched[f"r{i}"][0] == expected(p, 12)


@pytest.mark.parametrize("budget", [1, 3, 7, 64])
def test_chunked_prefill_does_not_change_output(budget: int) -> None:
    ps = prompts(2, 6)
    engine = make_engine(budget=budget)
    out = run(engine, ps)
    for i, p in enumerate(ps):
        assert out[f"r{i}"][0] == expected(p, 12)
    assert_pool_full(engine)


def test_preemption_recomputes_and_keeps_output() -> None:
    ps = prompts(3, 8)
    engine = make_engine(num_blocks=16, block_size=4, max_model_len=60)
    out = run(engine, ps)
    assert engine.scheduler.num_preemptions > 0
    for i, p in enumerate(ps):
        assert out[f"r{i}"][0] == expected(p, 12)
    assert_pool_full(engine)


def test_prefix_cache_hits_keep_output_and_skip_compute() -> None:
    shared = list(range(1, 21))
    ps = prompts(4, 5, shared=shared)
    runner = FakeRunner(4)
    engine = make_engine(runner=runner)
    engine.add_request("warm", shared + [3], GREEDY)
    run_all(engine)
    before = runner.num_computed
    out = run(engine, ps)
    for i, p in enumerate(ps):
        assert out[f"r{i}"][0] == expected(p, 12)
    computed = runner.num_computed - before
    uncached = sum(len(p) + 11 for p in ps)
    assert computed <= uncached - 5 * 20  # 20 shared tokens = 5 full blocks each, all hits
    assert engine.stats()["prefix_cache_hits"] >= 25
    assert_pool_full(engine)


def test_prefix_cache_disabled_same_output() -> None:
    ps = prompts(5, 5, shared=list(range(1, 13)))
    assert run(make_engine(prefix=False), ps) == run(make_engine(prefix=True), ps)


@pytest.mark.parametrize("prompt_len", [1, 4, 5, 9])
def test_fork_shares_prompt_and_matches_single(prompt_len: int) -> None:
    prompt = list(range(1, prompt_len + 1))
    runner = FakeRunner(4)
    engine = make_engine(runner=runner)
    engine.add_request("x", prompt, SamplingParams(n=5, temperature=0, max_tokens=12, ignore_eos=True))
    out = run_all(engine)
    assert sorted(out["x"]) == list(range(5))
    for tokens in out["x"].values():
        assert tokens == expected(prompt, 12)
    # The prompt minus its last token is computed once; each sample computes that token + 11 more.
    assert runner.num_computed == (prompt_len - 1) + 5 * 12
    assert_pool_full(engine)


def test_forked_samples_with_different_randomness_diverge_and_are_checked() -> None:
    engine = make_engine(num_blocks=40)
    engine.add_request("x", list(range(1, 11)), SamplingParams(n=6, temperature=1.0, seed=3,
                                                             max_tokens=20, ignore_eos=True))
    out = run_all(engine)
    assert len({tuple(v) for v in out["x"].values()}) > 1
    assert_pool_full(engine)


def test_abort_returns_every_block() -> None:
    engine = make_engine()
    for i, p in enumerate(prompts(6, 6)):
        engine.add_request(f"r{i}", p, SamplingParams(n=2, temperature=0, max_tokens=50, ignore_eos=True))
    for _ in range(5):
        engine.step()
    for i in range(6):
        final = engine.abort_request(f"r{i}")
        assert final is not None and final.finished
        assert all(o.finish_reason == FinishReason.ABORT for o in final.outputs)
    assert engine.abort_request("r0") is None
    engine.step()
    assert not engine.has_unfinished()
    assert_pool_full(engine)


def test_stop_conditions() -> None:
    engine = make_engine()
    prompt = [5, 6, 7]
    ref = expected(prompt, 12)
    engine.add_request("tok", prompt, SamplingParams(temperature=0, max_tokens=12,
                                                     stop_token_ids=(ref[3],)))
    engine.add_request("len", prompt, SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
    out = {}
    while engine.has_unfinished():
        for d in engine.step():
            for o in d.outputs:
                acc = out.setdefault(d.request_id, {"ids": [], "text": ""})
                acc["ids"] += o.token_ids
                acc["text"] += o.text
                acc["reason"], acc["stop"] = o.finish_reason, o.stop_reason
    first = ref.index(ref[3])
    assert out["tok"]["ids"] == ref[:first + 1] and out["tok"]["reason"] == FinishReason.STOP
    assert out["tok"]["stop"] == ref[3]
    assert out["len"]["ids"] == ref[:4] and out["len"]["reason"] == FinishReason.LENGTH


def test_stop_string_is_cut_and_never_streamed() -> None:
    from tests.engine.fake import FakeTokenizer

    engine = make_engine()
    prompt = [11, 12, 13]
    ref = expected(prompt, 12)
    full = FakeTokenizer().decode(ref)
    stop = full[4:6]
    engine.add_request("s", prompt, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True,
                                                   stop=(stop,)))
    text, reason = "", None
    while engine.has_unfinished():
        for d in engine.step():
            for o in d.outputs:
                text += o.text
                reason = (o.finish_reason, o.stop_reason)
                assert stop not in text
    assert text == full[:full.index(stop)]
    assert reason == (FinishReason.STOP, stop)


def test_eos_stops_unless_ignored_and_min_tokens() -> None:
    class EosRunner(FakeRunner):
        def execute(self, out):
            result = super().execute(out)
            for rid in result.sampled:
                result.sampled[rid] = EOS
            return result

    engine = make_engine(runner=EosRunner(4))
    engine.add_request("a", [3, 4], SamplingParams(temperature=0, max_tokens=5))
    engine.add_request("b", [3, 4], SamplingParams(temperature=0, max_tokens=5, ignore_eos=True))
    out = run_all(engine)
    assert out["a"][0] == [EOS]
    assert out["b"][0] == [EOS] * 5


def test_bad_requests_are_rejected_with_clear_errors() -> None:
    engine = make_engine(max_model_len=20)
    with pytest.raises(RequestError, match="empty"):
        engine.add_request("a", [], GREEDY)
    with pytest.raises(RequestError, match="outside the vocabulary"):
        engine.add_request("a", [1, VOCAB + 3], GREEDY)
    with pytest.raises(RequestError, match="context length"):
        engine.add_request("a", list(range(1, 21)), GREEDY)
    engine.add_request("a", [1, 2], GREEDY)
    with pytest.raises(RequestError, match="already in use"):
        engine.add_request("a", [1, 2], GREEDY)
    assert len(engine.groups) == 1


def test_queue_limit() -> None:
    from mixserve.config import CacheConfig, EngineConfig, SchedulerConfig
    from mixserve.engine.engine import Engine, ModelInfo
    from tests.engine.fake import FakeTokenizer

    config = EngineConfig(cache=CacheConfig(block_size=4, num_blocks=64),
                          scheduler=SchedulerConfig(max_num_waiting=2))
    engine = Engine(config, FakeRunner(4), FakeTokenizer(), ModelInfo(100, VOCAB, (EOS,), 64))
    engine.add_request("a", [1], GREEDY)
    engine.add_request("b", [1], GREEDY)
    with pytest.raises(QueueFullError):
        engine.add_request("c", [1], GREEDY)


def test_length_capped_by_context() -> None:
    engine = make_engine(max_model_len=10)
    engine.add_request("a", [1, 2, 3, 4, 5, 6], SamplingParams(temperature=0, max_tokens=None,
                                                               ignore_eos=True))
    out = run_all(engine)
    assert len(out["a"][0]) == 4


def test_failing_request_does_not_take_down_others() -> None:
    engine = make_engine(runner=FakeRunner(4, fail_on_token=42))
    engine.add_request("bad", [1, 42, 3], GREEDY)
    engine.add_request("good", [5, 6, 7], GREEDY)
    finals = {}
    while engine.has_unfinished():
        for d in engine.step():
            for o in d.outputs:
                finals.setdefault(d.request_id, []).append(o)
    assert finals["bad"][-1].finish_reason == FinishReason.ERROR
    assert "poisoned" in (finals["bad"][-1].error or "")
    good = [t for o in finals["good"] for t in o.token_ids]
    assert good == expected([5, 6, 7], 12)
    assert_pool_full(engine)


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 10_000), num_blocks=st.integers(12, 40), budget=st.integers(1, 24),
       block_size=st.sampled_from([1, 2, 4, 8]))
def test_random_workloads_keep_kv_consistent(seed: int, num_blocks: int, budget: int,
                                              block_size: int) -> None:
    rng = random.Random(seed)
    max_len = min(40, num_blocks * block_size)
    engine = make_engine(num_blocks=num_blocks, block_size=block_size, budget=budget,
                         max_model_len=max_len)
    refs = {}
    for i in range(rng.randrange(1, 8)):
        prompt = [rng.randrange(1, VOCAB) for _ in range(rng.randrange(1, max_len // 2))]
        if rng.random() < 0.4 and refs:  # share a prefix with an earlier prompt
            prompt = list(next(iter(refs.values()))[0][: rng.randrange(1, 8)]) + prompt
            prompt = prompt[: max_len - 2]
        n = rng.choice([1, 1, 2, 3])
        max_tokens = rng.randrange(1, max_len - len(prompt))
        engine.add_request(f"r{i}", prompt, SamplingParams(n=n, temperature=0, max_tokens=max_tokens,
                                                           ignore_eos=True))
        refs[f"r{i}"] = (prompt, max_tokens)
    aborted = set()
    out: dict[str, dict[int, list[int]]] = {}
    for _ in range(5000):
        if not engine.has_unfinished():
            break
        if rng.random() < 0.05:
            victim = rng.choice(list(refs))
            if engine.abort_request(victim) is not None:
                aborted.add(victim)
        for d in engine.step():
            for o in d.outputs:
                out.setdefault(d.request_id, {}).setdefault(o.index, []).extend(o.token_ids)
    assert not engine.has_unfinished()
    for rid, (prompt, max_tokens) in refs.items():
        if rid in aborted:
            continue
        want = expected(prompt, max_tokens)
        for tokens in out[rid].values():
            assert tokens == want
    assert_pool_full(engine)


def test_control_plane_imports_no_torch() -> None:
    import subprocess
    import sys

    code = ("import sys, mixserve, mixserve.engine.engine, mixserve.engine.scheduler; "
            "assert 'torch' not in sys.modules, 'control plane pulled in torch'")
    subprocess.run([sys.executable, "-c", code], check=True)
