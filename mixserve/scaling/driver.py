"""The tiny synchronous driver: runs strategies to completion on an engine's `Dispatcher`.

Many strategies can share one engine and run batched together; outputs of other owners on the same
dispatcher (an `LLM.stream`, plain requests) keep flowing to them while the strategies run."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from mixserve.engine.dispatcher import Dispatcher, run_until
from mixserve.engine.engine import Engine
from mixserve.scaling.base import ScaleResult, Strategy


def run_strategies(target: Engine | Dispatcher, strategies: Sequence[Strategy],
                   on_done: Callable[[int, ScaleResult], None] | None = None) -> list[ScaleResult]:
    """Start every strategy, step until all are done; results in order. The first strategy that
    fails raises here (after the others were stopped and their requests freed)."""
    dispatcher = target if isinstance(target, Dispatcher) else Dispatcher(target)
    results: list[ScaleResult | None] = [None] * len(strategies)
    errors: list[BaseException] = []

    def finisher(i: int) -> Callable[[Any, BaseException | None], None]:
        def finish(result: Any, error: BaseException | None) -> None:
            if error is not None:
                errors.append(error)
                return
            results[i] = result
            if on_done is not None:
                on_done(i, result)
        return finish

    try:
        for i, s in enumerate(strategies):
            dispatcher.start(s, finisher(i))
            if errors:
                raise errors[0]
        run_until(dispatcher, lambda: bool(errors) or all(r is not None for r in results), "strategies")
        if errors:
            raise errors[0]
    finally:
        for s, r in zip(strategies, results):
            if r is None:
                dispatcher.drop(s, RuntimeError("stopped"))
    return [r for r in results if r is not None]


def run_strategy(target: Engine | Dispatcher, strategy: Strategy) -> ScaleResult:
    return run_strategies(target, [strategy])[0]
