"""Step-level search with an exact process reward, KV sharing through fork, and input errors."""

from __future__ import annotations

import pytest

from mixserve.sampling_params import SamplingParams
from mixserve.scaling import ScaleConfig, ScalingError, make_strategy, make_verifier, run_strategies
from mixserve.scaling.synthetic import AnswerSpec, CountdownStepsPolicy, WordTokenizer, make_synthetic_engine
from mixserve.scaling.tasks import get_task
from tests.engine.fake import FakeRunner, make_engine
from tests.engine.test_engine import assert_pool_full
from tests.scaling.conftest import run_answers

TASK = get_task("countdown_steps")
PROBLEMS = TASK.generate(30, seed=0, difficulty=4)
SEARCH = ScaleConfig(max_steps=6)


def solve_rate(name: str, verifier: str, budget: int = 16) -> tuple[float, list]:
    tok = WordTokenizer()
    engine = make_synthetic_engine(CountdownStepsPolicy(PROBLEMS), tok)
    params = SamplingParams(temperature=1.0, max_tokens=200, seed=3)
    strategies = [make_strategy(name, tok.encode(p.question + "\n"), budget, params,
                                verifier=make_verifier(verifier, task=TASK, problem=p), extract=TASK.extract,
                                config=SEARCH, strategy_id=f"{name}-{verifier}-{i}")
                  for i, p in enumerate(PROBLEMS)]
    results = run_strategies(engine, strategies)
    assert engine.num_paused == 0 and not engine.has_unfinished()
    assert engine.scheduler.kv.pool.num_free_blocks == engine.scheduler.kv.pool.num_blocks
    solved = sum(TASK.check(p, TASK.extract(r.text)) for p, r in zip(PROBLEMS, results, strict=True))
    return solved / len(PROBLEMS), results


def test_search_with_oracle_process_reward_solves_what_sampling_rarely_does() -> None:
    pass1, _ = solve_rate("sample", "task", budget=16)  # the first sample = plain sampling
    pf, pf_results = solve_rate("pf", "oracle_prm")
    beam, _ = solve_rate("beam", "oracle_prm")
    noisy, _ = solve_rate("pf", "noisy_prm")
    assert pass1 < 0.2
    assert pf >= 0.6 and beam >= 0.5
    assert noisy > pass1
    assert any(r.info["num_resamples"] > 0 for r in pf_results)


def test_branching_recomputes_no_prefix() -> None:
    _, results = solve_rate("beam", "oracle_prm")
    for r in results:
        u = r.usage
        prompt_len = u.policy_prompt_tokens // 16  # first round: 16 samples of the bare prompt ...
        num_forks = u.num_requests - 1
        # ... prefilled once (all but the last token, then 1 per sample); each fork computes exactly
        # the one token its parent sampled last and nothing of the shared prefix.
        assert u.policy_prefill_tokens <= prompt_len - 1 + 16 + num_forks
        assert u.policy_reused_tokens > 0.9 * u.policy_prompt_tokens


@pytest.mark.parametrize("budget", [4, 16])
def test_n_samples_prefill_the_prompt_once(budget: int) -> None:
    specs = {"0": AnswerSpec("42", 0.5)}
    (r,) = run_answers(specs, "majority", budget)
    prompt_len = 3  # "Q0:" " solve" "\n"
    assert r.usage.policy_prompt_tokens == budget * prompt_len
    assert r.usage.policy_prefill_tokens == prompt_len - 1 + budget
    total = r.usage.policy_prompt_tokens
    assert r.usage.policy_reused_tokens >= (budget - 1) / budget * total - budget


@pytest.mark.parametrize("name", ["beam", "pf", "majority", "adaptive", "ffs"])
def test_strategies_on_the_kv_checking_fake_runner(name: str) -> None:
    """The fake runner verifies every KV slot it reads: search forks must never read a wrong block."""
    engine = make_engine(num_blocks=400, block_size=4, max_num_seqs=64, max_model_len=120,
                         runner=FakeRunner(4))
    params = SamplingParams(temperature=1.0, max_tokens=20, seed=1, ignore_eos=True)
    verifier = (lambda text: (len(text) % 7) / 7.0) if name in ("beam", "pf") else None
    config = ScaleConfig(step_separator="e", max_steps=4, step_max_tokens=6)
    strategies = [make_strategy(name, [1 + i, 2, 3, 4, 5, 6], 8, params, verifier=verifier, config=config,
                                extract=lambda t: t[-1:] or None, strategy_id=f"{name}{i}") for i in range(3)]
    results = run_strategies(engine, strategies)
    assert all(r.candidates for r in results)
    assert engine.num_paused == 0
    assert_pool_full(engine)


def test_cancel_frees_everything() -> None:
    tok = WordTokenizer()
    engine = make_synthetic_engine(CountdownStepsPolicy(PROBLEMS), tok)
    p = PROBLEMS[0]
    s = make_strategy("pf", tok.encode(p.question + "\n"), 8, SamplingParams(max_tokens=100, seed=0),
                      verifier=make_verifier("oracle_prm", task=TASK, problem=p), config=SEARCH, strategy_id="c")
    s.start(engine)
    for _ in range(12):
        for out in engine.step():
            if s.owns(out.request_id):
                s.on_output(engine, out)
    s.cancel(engine)
    assert s.done and engine.num_paused == 0
    engine.step()
    assert not engine.has_unfinished()
    assert engine.scheduler.kv.pool.num_free_blocks == engine.scheduler.kv.pool.num_blocks


def test_bad_input_names_the_field() -> None:
    with pytest.raises(ScalingError, match="strategy='nope'"):
        make_strategy("nope", [1], 4)
    with pytest.raises(ScalingError, match="budget=0"):
        make_strategy("majority", [1], 0)
    with pytest.raises(ScalingError, match="verifier='nope'"):
        make_strategy("bon", [1], 4, verifier="nope")
    with pytest.raises(ScalingError, match="verifier=None"):
        make_strategy("bon", [1], 4)
    with pytest.raises(ScalingError, match="task='nope'"):
        get_task("nope")
    with pytest.raises(ScalingError, match="difficulty=9"):
        TASK.generate(2, 0, 9)
    with pytest.raises(ScalingError, match="needs a task problem"):
        make_verifier("oracle_prm")
    with pytest.raises(ScalingError, match="no exact process reward"):
        arithmetic = get_task("arithmetic")
        make_verifier("oracle_prm", task=arithmetic, problem=arithmetic.generate(1, 0, 1)[0])
