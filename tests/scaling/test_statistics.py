"""Strategies against closed forms, with a synthetic policy of known per-problem success probability
run through the real engine control plane (scheduler, KV manager, fork, abort)."""

from __future__ import annotations

import math
import random

import pytest

from mixserve.scaling import ScaleConfig
from mixserve.scaling.answers import extract_answer
from mixserve.scaling.metrics import mean_pass_at_k, pass_at_k
from mixserve.scaling.synthetic import AnswerSpec
from tests.scaling.conftest import accuracy, run_answers

WRONG5 = tuple((str(w), 1.0) for w in range(5))


def tolerance(probs: list[float], sigmas: float = 4.0) -> float:
    """`sigmas` standard errors of the mean of Bernoullis with these success probabilities."""
    return sigmas * math.sqrt(sum(q * (1 - q) for q in probs)) / len(probs) + 1e-9


def test_pass_at_k_estimator_matches_combinatorics() -> None:
    for n in range(1, 9):
        for c in range(n + 1):
            for k in range(1, n + 1):
                exact = 1 - math.comb(n - c, k) / math.comb(n, k)
                assert pass_at_k(n, c, k) == pytest.approx(exact, abs=1e-12)
    with pytest.raises(ValueError, match="k=5"):
        pass_at_k(4, 1, 5)


def test_repeated_sampling_coverage_is_one_minus_q_to_the_k() -> None:
    rng = random.Random(0)
    ps = [rng.uniform(0.01, 0.4) for _ in range(300)]
    specs = {str(i): AnswerSpec("42", p, WRONG5) for i, p in enumerate(ps)}
    results = run_answers(specs, "sample", 16)
    counts = [(len(r.candidates), sum(c.answer == "42" for c in r.candidates)) for r in results]
    assert all(n == 16 for n, _ in counts)
    for k in (1, 2, 4, 8, 16):
        theory = [1 - (1 - p) ** k for p in ps]
        measured = mean_pass_at_k(counts, k)
        assert abs(measured - sum(theory) / len(theory)) < tolerance(theory), k


def test_majority_rises_when_right_is_the_mode_and_plateaus_when_not() -> None:
    good = {str(i): AnswerSpec("42", 0.4, WRONG5) for i in range(200)}  # each wrong answer: 0.12
    one = accuracy(run_answers(good, "majority", 1))
    assert abs(one - 0.4) < tolerance([0.4] * 200)
    assert accuracy(run_answers(good, "majority", 32)) > 0.95
    bad = {str(i): AnswerSpec("42", 0.3, (("7", 1.0),)) for i in range(200)}  # "7" has 0.7
    results = run_answers(bad, "majority", 32)
    assert accuracy(results) < 0.05
    coverage = sum(any(c.answer == "42" for c in r.candidates) for r in results) / len(results)
    assert coverage > 0.99  # the Monkeys gap: coverage keeps rising, the vote does not


HACKED = {"42": 0.9, "7": 0.1, "13": 1.0}


def hacked_reward(text: str) -> float:
    """Rewards the rare wrong answer 13 above the right one (reward hacking)."""
    return HACKED.get(extract_answer(text) or "", 0.0)


def test_best_of_n_degrades_with_n_under_reward_hacking_but_bom_does_not() -> None:
    specs = {str(i): AnswerSpec("42", 0.4, (("7", 0.5 / 0.6), ("13", 0.1 / 0.6))) for i in range(200)}
    bon = {}
    for n in (1, 4, 32):
        theory = 0.9**n - 0.5**n  # no 13 drawn, and at least one 42
        bon[n] = accuracy(run_answers(specs, "bon", n, verifier=hacked_reward))
        assert abs(bon[n] - theory) < tolerance([theory] * 200), n
    assert bon[32] < bon[4]
    config = ScaleConfig(bom_alpha=0.25)
    fewer = dict(list(specs.items())[:100])
    bom = {n: accuracy(run_answers(fewer, "bom", n, verifier=hacked_reward, config=config)) for n in (4, 32, 64)}
    assert bom[64] >= bom[4] - 0.02 and bom[32] >= bom[4] - 0.02
    assert bom[64] > 0.95


def test_adaptive_stopping_spends_fewer_samples_at_equal_accuracy() -> None:
    specs = {str(i): AnswerSpec("42", 0.85 if i % 2 else 0.6, WRONG5) for i in range(200)}
    full = run_answers(specs, "majority", 16)
    for rule in ("beta", "supermajority"):
        adaptive = run_answers(specs, "adaptive", 16, config=ScaleConfig(adaptive_rule=rule), tag=rule)
        used = sum(r.usage.num_samples for r in adaptive) / len(adaptive)
        generated = sum(r.usage.policy_generated_tokens for r in adaptive)
        assert used < 0.65 * 16, rule
        assert generated < 0.65 * sum(r.usage.policy_generated_tokens for r in full)
        assert accuracy(adaptive) >= accuracy(full) - 0.03, rule


def test_first_finish_returns_the_shortest_and_aborts_the_rest() -> None:
    # Right answers are short, wrong ones carry 6 words of padding: FFS is right iff any sample is.
    specs = {str(i): AnswerSpec("42", 0.2, (("7", 1.0),), filler=(("7", 6),)) for i in range(200)}
    results = run_answers(specs, "ffs", 8)
    theory = 1 - 0.8**8
    assert abs(accuracy(results) - theory) < tolerance([theory] * 200)
    long_all = 8 * 10  # what finishing every sample would generate at most
    assert sum(r.usage.policy_generated_tokens for r in results) / len(results) < long_all / 2


def test_confidence_selection_picks_the_confident_answer() -> None:
    specs = {str(i): AnswerSpec("42", 0.25, WRONG5, logprob=(("42", -0.01),) + tuple((w, -1.0) for w, _ in WRONG5))
             for i in range(200)}
    theory = 1 - 0.75**8
    assert abs(accuracy(run_answers(specs, "confidence", 8)) - theory) < tolerance([theory] * 200)
