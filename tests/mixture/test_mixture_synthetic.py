"""End to end over synthetic experts with known per-skill accuracy: profiles route each skill to its
best model, accuracies match closed forms, grouped batches load each model once."""

from __future__ import annotations

import math
from collections import Counter

import pytest

from mixserve.mixture.experts import Question
from mixserve.mixture.grading import TaskGrader, mixed_problems, questions_from
from mixserve.mixture.pipeline import Mixture, MixtureConfig
from mixserve.mixture.profile import profile_models
from mixserve.mixture.recruit import RecruitConfig, recruit_probabilities
from mixserve.mixture.skills import SkillConfig
from tests.mixture.conftest import expert_of, synthetic_pool

ACC = {"mathy": {"arithmetic": 0.9, "sorting": 0.2, "gcd": 0.5},
       "sorty": {"arithmetic": 0.2, "sorting": 0.9, "gcd": 0.5},
       "meh": {"arithmetic": 0.4, "sorting": 0.4, "gcd": 0.4}}
TASKS = ["arithmetic", "sorting", "gcd"]


def _within(observed: float, p: float, n: int) -> None:
    assert abs(observed - p) < 4 * math.sqrt(p * (1 - p) / n) + 1e-9, (observed, p, n)


def _mixture(n_val: int = 60, **config: object) -> tuple[Mixture, TaskGrader]:
    pool, _ = synthetic_pool(ACC)
    problems = mixed_problems(TASKS, n_val, seed=1, difficulty=1)
    grader = TaskGrader()
    profiles, _, _ = profile_models(pool, expert_of, questions_from(problems), grader, SkillConfig(), "meh")
    mixture = Mixture(pool, expert_of, profiles, grader, MixtureConfig(**config),  # type: ignore[arg-type]
                      annotator="meh")
    return mixture, grader


def test_profiles_reflect_skills_and_route_each_skill_to_its_best_model() -> None:
    mixture, _ = _mixture()
    p = mixture.profiles
    assert p.scores["mathy"]["arithmetic"] > 0 > p.scores["sorty"]["arithmetic"]
    assert p.scores["sorty"]["sorting"] > 0 > p.scores["mathy"]["sorting"]
    probs = recruit_probabilities(p, ["arithmetic", "addition"])
    assert max(probs, key=probs.__getitem__) == "mathy"
    # recruitment draws follow the formula, question by question
    problems = mixed_problems(["arithmetic"], 400, seed=7, difficulty=1)
    run = mixture.run(questions_from(problems), "symbolic")
    counts = Counter(m for r in run.results for m in r.recruited)
    n = sum(counts.values())
    for m, prob in probs.items():
        _within(counts[m] / n, prob, n)
    assert all(r.keywords == ["arithmetic", "addition"] for r in run.results)


def test_symbolic_accuracy_matches_closed_form() -> None:
    """Slots are iid: each picks m with prob pi_m and is right with prob acc_m, so a slot is right with
    a = sum pi_m acc_m. The synthetic aggregator takes the majority (ties: first slot; wrong answers never
    agree): P = a^3 + 3a^2(1-a) + a(1-a)^2."""
    mixture, _ = _mixture()
    problems = mixed_problems(["arithmetic"], 1500, seed=3, difficulty=1)
    probs = recruit_probabilities(mixture.profiles, ["arithmetic", "addition"])
    a = sum(pi * ACC[m]["arithmetic"] for m, pi in probs.items())
    expected = a**3 + 3 * a**2 * (1 - a) + a * (1 - a) ** 2
    run = mixture.run(questions_from(problems), "symbolic")
    _within(run.accuracy, expected, len(problems))
    assert expected > max(acc["arithmetic"] for acc in ACC.values())  # the mixture beats the best single model


def test_majority_and_single_closed_forms() -> None:
    mixture, _ = _mixture()
    problems = mixed_problems(["sorting"], 1500, seed=4, difficulty=1)
    p1, p2, p3 = (ACC[m]["sorting"] for m in ("mathy", "sorty", "meh"))  # pool order = tie order
    expected = p1 * p2 + p1 * p3 + p2 * p3 - 2 * p1 * p2 * p3 + p1 * (1 - p2) * (1 - p3)
    _within(mixture.run(questions_from(problems), "majority").accuracy, expected, len(problems))
    single = mixture.run(questions_from(problems), "single")
    _within(single.accuracy, ACC[mixture.best_model()]["sorting"], len(problems))


def test_grouped_batch_loads_each_model_once() -> None:
    mixture, _ = _mixture(recruit=RecruitConfig(k=3))
    questions = questions_from(mixed_problems(TASKS, 30, seed=5, difficulty=1))
    run = mixture.run(questions, "symbolic")
    used = {m for r in run.results for m in r.recruited}
    experts = run.stages["experts"]
    assert experts.loads <= len(used) and experts.switches == len(used)
    assert sum(c.requests for c in experts.compute.values()) == 3 * len(questions)
    per_q = Mixture(mixture.pool, mixture.expert_of, mixture.profiles, mixture.grader,
                    MixtureConfig(scheduling="per-question"), annotator="meh")
    slow = per_q.run(questions, "symbolic")
    assert slow.stages["experts"].loads > 3 * experts.loads
    assert mixture.pool.peak_bytes <= mixture.pool.budget_bytes


def test_aggregator_benchmark_picks_the_best_aggregator() -> None:
    pool, _ = synthetic_pool(ACC)
    pool.loader.experts["sorty"].aggregate_accuracy = 0.95  # type: ignore[attr-defined]
    pool.loader.experts["mathy"].aggregate_accuracy = 0.3  # type: ignore[attr-defined]
    pool.loader.experts["meh"].aggregate_accuracy = 0.5  # type: ignore[attr-defined]
    problems = mixed_problems(TASKS, 40, seed=1, difficulty=1)
    profiles, _, _ = profile_models(pool, expert_of, questions_from(problems), TaskGrader(),
                                    SkillConfig(), "meh")
    assert profiles.aggregator == "sorty"
    assert profiles.aggregator_scores["sorty"] > profiles.aggregator_scores["meh"]


def test_moa_runs_layers_then_aggregates() -> None:
    mixture, _ = _mixture(moa_layers=2)
    questions = questions_from(mixed_problems(TASKS, 5, seed=6, difficulty=1))
    run = mixture.run(questions, "moa")
    assert set(run.stages) == {"experts", "moa_layer2", "aggregate"}
    assert all(len(r.answers) == 3 for r in run.results)


def test_unknown_method() -> None:
    mixture, _ = _mixture(n_val=3)
    with pytest.raises(ValueError, match="invalid method='best'"):
        mixture.run([Question("q", "x")], "best")


class _CountingAggregator:
    """Wraps a synthetic expert; counts the aggregate requests it gets."""

    def __init__(self, inner: object) -> None:
        self.inner, self.aggregated = inner, 0

    def generate(self, requests: list[object]) -> list[object]:
        self.aggregated += sum(r.role == "aggregate" for r in requests)  # type: ignore[attr-defined]
        return self.inner.generate(requests)  # type: ignore[attr-defined]


def test_aggregation_modes() -> None:
    """aggregator (paper, default): every question goes to the aggregator; skip-on-agreement (MOSAIC):
    only the questions whose k answers do not all agree; majority: none, the vote of the k answers."""
    base, _ = _mixture()
    assert base.config.aggregation == "aggregator"
    questions = questions_from(mixed_problems(TASKS, 20, seed=8, difficulty=1))
    runs = {}
    for mode in ("aggregator", "skip-on-agreement", "majority"):
        wrapped: dict[str, _CountingAggregator] = {}

        def counting(name: str, handle: object, wrapped: dict[str, _CountingAggregator] = wrapped) -> object:
            return wrapped.setdefault(name, _CountingAggregator(handle))
        mixture = Mixture(base.pool, counting, base.profiles, base.grader,  # type: ignore[arg-type]
                          MixtureConfig(aggregation=mode), annotator="meh")  # type: ignore[arg-type]
        run = mixture.run(questions, "symbolic")
        runs[mode] = run
        asked = sum(w.aggregated for w in wrapped.values())
        agree = [r for r in run.results
                 if len({base.grader.extract(r.question, a) for a in r.answers} - {None}) == 1
                 and len({base.grader.extract(r.question, a) for a in r.answers}) == 1]
        if mode == "aggregator":
            assert asked == len(questions) and all(r.aggregated for r in run.results)
        elif mode == "skip-on-agreement":
            assert 0 < len(agree) < len(questions)
            assert asked == len(questions) - len(agree)
            assert all(not r.aggregated and r.answer == base.grader.extract(r.question, r.answers[0])
                       for r in agree)
        else:
            assert asked == 0 and "aggregate" not in run.stages and not any(r.aggregated for r in run.results)
    # the same recruitment and expert answers in every mode (seeded), only the final step differs
    assert [r.answers for r in runs["aggregator"].results] == [r.answers for r in runs["majority"].results]
    # the synthetic aggregator votes, so all three modes give the same answers here
    assert [r.answer for r in runs["aggregator"].results] == [r.answer for r in runs["majority"].results] == [
        r.answer for r in runs["skip-on-agreement"].results]
    with pytest.raises(ValueError, match="aggregation='best'"):
        MixtureConfig(aggregation="best")  # type: ignore[arg-type]


def test_symbolic_reuses_given_keywords() -> None:
    """Keywords from an earlier run: no keyword stage, the same recruitment (seeded) as extracting them."""
    mixture, _ = _mixture()
    questions = questions_from(mixed_problems(TASKS, 6, seed=9, difficulty=1))
    first = mixture.run(questions, "symbolic")
    again = mixture.run(questions, "symbolic", keywords=[r.keywords for r in first.results])
    assert "keywords" in first.stages and "keywords" not in again.stages
    assert [r.recruited for r in again.results] == [r.recruited for r in first.results]
    with pytest.raises(ValueError, match="2 lists for 18 questions"):
        mixture.run(questions, "symbolic", keywords=[[], []])
