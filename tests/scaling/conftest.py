"""Synthetic-policy helpers: run many strategies through the real engine control plane in one go."""

from __future__ import annotations

from collections.abc import Callable

from mixserve.sampling_params import SamplingParams
from mixserve.scaling import ScaleConfig, ScaleResult, make_strategy, run_strategies
from mixserve.scaling.synthetic import AnswerPolicy, AnswerSpec, WordTokenizer, make_synthetic_engine

PARAMS = SamplingParams(temperature=1.0, max_tokens=64, seed=7)


def run_answers(specs: dict[str, AnswerSpec], name: str, budget: int, verifier=None,
                config: ScaleConfig | None = None, tag: str = "") -> list[ScaleResult]:
    """One strategy per problem id, all batched on one synthetic engine; results in spec order."""
    tok = WordTokenizer()
    engine = make_synthetic_engine(AnswerPolicy(specs), tok)
    strategies = [make_strategy(name, tok.encode(f"Q{pid}: solve\n"), budget, PARAMS, verifier=verifier,
                                config=config, strategy_id=f"{name}{tag}-{budget}-{pid}")
                  for pid in specs]
    results = run_strategies(engine, strategies)
    assert not engine.has_unfinished() and engine.num_paused == 0
    pool = engine.scheduler.kv.pool
    assert pool.num_free_blocks == pool.num_blocks
    return results


def accuracy(results: list[ScaleResult], correct: Callable[[int], str] = lambda i: "42") -> float:
    return sum(r.answer == correct(i) for i, r in enumerate(results)) / len(results)
