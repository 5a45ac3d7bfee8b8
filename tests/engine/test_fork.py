"""Public branching API: pause on finish, fork from a running or paused sample, release.

The fake runner checks every KV slot it reads, so a child that reads a wrong or overwritten block
fails loudly; `expected` is the recomputed (from scratch) greedy continuation.
"""

from __future__ import annotations

import pytest

from mixserve.engine.engine import RequestError
from mixserve.outputs import FinishReason
from mixserve.sampling_params import SamplingParams
from tests.engine.fake import FakeRunner, make_engine, run_all
from tests.engine.test_engine import assert_pool_full, expected


def greedy(max_tokens: int) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)


def step_until_done(engine, request_id: str) -> dict:
    last = None
    while engine.has_unfinished():
        for delta in engine.step():
            if delta.request_id == request_id:
                last = delta
    assert last is not None
    return last


@pytest.mark.parametrize("prompt_len", [1, 3, 4, 7])
def test_paused_sample_forks_into_recomputed_continuation(prompt_len: int) -> None:
    prompt = list(range(1, prompt_len + 1))
    runner = FakeRunner(4)
    engine = make_engine(runner=runner)
    engine.add_request("p", prompt, greedy(5), pause_on_finish=True)
    final = step_until_done(engine, "p")
    assert final.finished and final.outputs[0].finish_reason == FinishReason.LENGTH
    assert engine.num_paused == 1 and engine.stats()["num_free_blocks"] < 64
    first = expected(prompt, 5)
    before = runner.num_computed
    for i in range(3):
        engine.fork_request("p", f"c{i}", greedy(6))
    assert engine.release_request("p") == 1
    out = run_all(engine)
    for i in range(3):
        # == generating 11 tokens in one go: the fork continues exactly where the parent stopped.
        assert out[f"c{i}"][0] == expected(prompt + first, 6)
    # Each child computes the parent's last sampled token and its own 5 decode inputs, no prefix.
    assert runner.num_computed - before == 3 * 6
    assert_pool_full(engine)


def test_fork_reports_reused_tokens_and_appended_tokens_are_computed() -> None:
    runner = FakeRunner(4)
    engine = make_engine(runner=runner)
    prompt = list(range(1, 10))
    engine.add_request("p", prompt, greedy(3), pause_on_finish=True)
    step_until_done(engine, "p")
    context = prompt + expected(prompt, 3)
    engine.fork_request("p", "judge", greedy(1), append_token_ids=[7, 8, 9])
    engine.release_request("p")
    final = step_until_done(engine, "judge")
    assert final.outputs[0].token_ids == expected(context + [7, 8, 9], 1)
    assert final.num_cached_tokens == len(context) - 1
    assert final.prompt_token_ids == context + [7, 8, 9]
    assert final.metrics.num_computed_prompt_tokens == 4  # last sampled token + 3 appended
    assert_pool_full(engine)


def test_fork_from_running_sample_shares_kv_and_both_continue() -> None:
    engine = make_engine()
    prompt = [3, 1, 4, 1, 5]
    engine.add_request("p", prompt, greedy(10))
    streamed: list[int] = []
    for _ in range(4):
        for delta in engine.step():
            streamed.extend(delta.outputs[0].token_ids)
    engine.fork_request("p", "c", greedy(4))
    out = run_all(engine)
    assert streamed + out["p"][0] == expected(prompt, 10)
    assert out["c"][0] == expected(prompt + streamed, 4)
    assert_pool_full(engine)


def test_pause_on_stop_string_keeps_the_separator_in_the_context() -> None:
    engine = make_engine()
    prompt = [11, 12, 13]
    tokens = expected(prompt, 40)
    letter = chr(ord("a") + tokens[2] % 26)  # the fake tokenizer prints token t >= 10 as a letter
    sep_at = next(i for i, t in enumerate(tokens) if t >= 10 and chr(ord("a") + t % 26) == letter)
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True, stop=(letter,),
                            include_stop_str_in_output=True)
    engine.add_request("p", prompt, params, pause_on_finish=True)
    final = step_until_done(engine, "p")
    assert final.outputs[0].finish_reason == FinishReason.STOP
    engine.fork_request("p", "next", greedy(3))
    engine.release_request("p")
    out = run_all(engine)
    assert out["next"][0] == expected(prompt + tokens[:sep_at + 1], 3)
    assert_pool_full(engine)


def test_n_samples_pause_individually_and_fork_by_index() -> None:
    engine = make_engine(num_blocks=80)
    params = SamplingParams(n=4, temperature=1.0, seed=1, max_tokens=4, ignore_eos=True)
    engine.add_request("g", [1, 2, 3, 4, 5], params, pause_on_finish=True)
    outs = run_all(engine)["g"]
    assert engine.num_paused == 4
    for i in range(4):
        engine.fork_request("g", f"c{i}", greedy(3), sample_index=i)
    assert engine.release_request("g") == 4
    children = run_all(engine)
    for i in range(4):
        assert children[f"c{i}"][0] == expected([1, 2, 3, 4, 5] + outs[i], 3)
    assert_pool_full(engine)


def test_abort_releases_paused_samples_and_bad_forks_are_rejected() -> None:
    engine = make_engine(max_model_len=20)
    engine.add_request("p", [1, 2, 3], greedy(2), pause_on_finish=True)
    run_all(engine)
    with pytest.raises(RequestError, match="already in use"):
        engine.add_request("p", [1], greedy(1))
    with pytest.raises(RequestError, match="not live"):
        engine.fork_request("nope", "c", greedy(1))
    with pytest.raises(RequestError, match="not live"):
        engine.fork_request("p", "c", greedy(1), sample_index=3)
    with pytest.raises(RequestError, match="n=1"):
        engine.fork_request("p", "c", SamplingParams(n=2))
    with pytest.raises(RequestError, match="vocabulary"):
        engine.fork_request("p", "c", greedy(1), append_token_ids=[10_000])
    with pytest.raises(RequestError, match="context length"):
        engine.fork_request("p", "c", greedy(1), append_token_ids=[1] * 20)
    assert engine.abort_request("p") is None
    assert engine.num_paused == 0
    assert engine.release_request("p") == 0
    engine.step()
    assert_pool_full(engine)


def test_abort_of_a_group_with_paused_and_running_samples_frees_all() -> None:
    engine = make_engine()
    engine.add_request("p", [1, 2, 3], greedy(2), pause_on_finish=True)
    run_all(engine)
    engine.fork_request("p", "c", greedy(30))
    engine.release_request("p")
    engine.step()
    final = engine.abort_request("c")
    assert final is not None and final.outputs[0].finish_reason == FinishReason.ABORT
    engine.step()
    assert_pool_full(engine)
