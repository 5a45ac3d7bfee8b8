"""Recruitment: the closed-form probabilities, sampling frequencies, the budget filter, profiles JSON."""

from __future__ import annotations

import math
import random
from collections import Counter
from pathlib import Path

import pytest

from mixserve.config import ConfigError
from mixserve.mixture.profiles import ModelCost, Profiles, build_profiles
from mixserve.mixture.recruit import RecruitConfig, normalize_to_probability, recruit, recruit_probabilities


def _profiles() -> Profiles:
    return Profiles({"a": {"add": 5, "sort": -3}, "b": {"add": -1, "sort": 4}, "c": {"add": 1}},
                    costs={"a": ModelCost(2.0, 500), "b": ModelCost(0.5, 100), "c": ModelCost(0.1, 50)})


def test_closed_form_probabilities() -> None:
    p = _profiles()
    # global strength: sums a=2, b=3, c=1 (all >= 0, no shift), squared (T=0.5) -> 4, 9, 1 over 14
    g = {"a": 4 / 14, "b": 9 / 14, "c": 1 / 14}
    assert normalize_to_probability({"a": 2, "b": 3, "c": 1}, 0.5) == pytest.approx(g)
    # "add": ranks a=5, b=-1, c=1 -> positive a, c; weights 5*g_a, 1*g_c
    w = {"a": 5 * g["a"], "c": 1 * g["c"]}
    expected = {m: v / sum(w.values()) for m, v in w.items()}
    assert recruit_probabilities(p, ["add"]) == pytest.approx(expected)
    # no positive rank: "add" for b only ... use a question whose ranks are all <= 0
    q = Profiles({"a": {"x": -2}, "b": {"x": -1}}, {})
    # global: sums -2, -1 -> shifted 1, 2 -> squared 1, 4 -> 0.2, 0.8; ranks shifted: a 1, b 2
    expected2 = {"a": 1 * 0.2 / (0.2 + 1.6), "b": 2 * 0.8 / (0.2 + 1.6)}
    assert recruit_probabilities(q, ["x"]) == pytest.approx(expected2)
    assert recruit_probabilities(p, ["unknown"]) == {}


def test_sampling_frequencies_follow_the_formula() -> None:
    p = _profiles()
    probs = recruit_probabilities(p, ["add", "sort"])
    rng = random.Random(0)
    n = 6000
    counts = Counter(m for _ in range(n // 3) for m in recruit(p, ["add", "sort"], rng))
    for m, prob in probs.items():
        sigma = math.sqrt(n * prob * (1 - prob))
        assert abs(counts[m] - n * prob) < 4 * sigma, (m, counts[m], n * prob)
    assert set(counts) <= set(probs)


def test_without_replacement_and_uniform_fallback() -> None:
    p = _profiles()
    picks = recruit(p, ["add"], random.Random(1), RecruitConfig(k=3, with_replacement=False))
    assert sorted(picks) == ["a", "c"]  # only two models have positive rank
    fallback = recruit(p, [], random.Random(1), RecruitConfig(k=3))
    assert len(fallback) == 3 and set(fallback) <= {"a", "b", "c"}


def test_budget_filter() -> None:
    p = _profiles()
    probs = recruit_probabilities(p, ["add"], RecruitConfig(max_latency_s=1.0))
    assert set(probs) == {"c"}  # a is too slow, b has no positive rank
    probs = recruit_probabilities(p, ["sort"], RecruitConfig(max_memory_bytes=200))
    assert set(probs) == {"b"}
    with pytest.raises(ConfigError, match="no model fits the budget"):
        recruit_probabilities(p, ["add"], RecruitConfig(max_latency_s=0.01))


def test_build_and_store_profiles(tmp_path: Path) -> None:
    p = build_profiles(["a", "b"], [("a", ["add", "carry"], True), ("a", ["add"], False), ("b", ["add"], True)])
    assert p.scores == {"a": {"add": 0, "carry": 1}, "b": {"add": 1}}
    assert p.accuracy == {"a": 0.5, "b": 1.0}
    p.costs = {"a": ModelCost(0.25, 1000)}
    p.aggregator = "b"
    path = tmp_path / "profiles.json"
    p.save(path)
    q = Profiles.load(path)
    assert (q.scores, q.accuracy, q.costs, q.aggregator) == (p.scores, p.accuracy, p.costs, "b")
    path.write_text('{"scores": {"a": {"add": "many"}}}')
    with pytest.raises(ConfigError, match=f"invalid profiles file {path}"):
        Profiles.load(path)
