"""The tiny synchronous driver: the only place (besides the server's engine thread) that steps the
engine on behalf of strategies. Many strategies can share one engine and run batched together."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from mixserve.scaling.base import ScaleResult, Strategy

if TYPE_CHECKING:
    from mixserve.engine.engine import Engine


def run_strategies(engine: Engine, strategies: Sequence[Strategy],
                   on_done: Callable[[int, ScaleResult], None] | None = None) -> list[ScaleResult]:
    """Start every strategy, feed each the deltas it owns until all are done; results in order."""
    by_id = {s.strategy_id: i for i, s in enumerate(strategies)}
    results: list[ScaleResult | None] = [None] * len(strategies)

    def collect(i: int) -> None:
        if results[i] is None and strategies[i].done:
            results[i] = strategies[i].result()
            if on_done is not None:
                on_done(i, results[i])  # type: ignore[arg-type]

    for i, s in enumerate(strategies):
        s.start(engine)
        collect(i)
    while any(r is None for r in results):
        if not engine.has_unfinished():
            stuck = [s.strategy_id for s, r in zip(strategies, results, strict=True) if r is None]
            raise RuntimeError(f"engine went idle while strategies wait: {stuck}")
        for out in engine.step():
            j = by_id.get(out.request_id.split("/", 1)[0])
            if j is not None and results[j] is None and strategies[j].owns(out.request_id):
                strategies[j].on_output(engine, out)
                collect(j)
    return [r for r in results if r is not None]


def run_strategy(engine: Engine, strategy: Strategy) -> ScaleResult:
    return run_strategies(engine, [strategy])[0]
