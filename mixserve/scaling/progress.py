"""Progress events of a running strategy (what the server streams as SSE): a `Controller` wrapper that,
after every delta it forwards, reports newly finished candidates (answer, tokens) and newly known
verifier scores, then the selection when the strategy is done.

Events are plain dicts: `{"event": "candidate", "problem", "request_id", "index", "answer", "num_tokens",
"finish_reason"}`, `{"event": "score", "problem", "key", "score"}` and `{"event": "selection", "answer",
"selected"}`. `emit` is called on the engine's thread and must be quick.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from mixserve.scaling.tracker import Tracker

if TYPE_CHECKING:
    from mixserve.engine.engine import Engine
    from mixserve.outputs import RequestOutput

Event = dict[str, Any]


def trackers_of(strategy: Any) -> list[Tracker]:
    """The trackers of a strategy (one; one per problem for batch strategies)."""
    if isinstance(getattr(strategy, "t", None), Tracker):
        return [strategy.t]
    return [p.tracker for p in getattr(strategy, "problems", [])]


class ProgressController:
    """Wraps a strategy; the same `controller_id`, so the dispatcher routes its requests here."""

    def __init__(self, inner: Any, emit: Callable[[Event], None]) -> None:
        self.inner = inner
        self.emit = emit
        self.trackers = trackers_of(inner)
        self._seen: set[tuple[int, str, int]] = set()
        self._num_scores = [0] * len(self.trackers)

    @property
    def controller_id(self) -> str:
        return str(self.inner.controller_id)

    def owns(self, request_id: str) -> bool:
        return bool(self.inner.owns(request_id))

    def start(self, engine: Engine) -> None:
        self.inner.start(engine)

    def on_output(self, engine: Engine, out: RequestOutput) -> None:
        self.inner.on_output(engine, out)
        for p, t in enumerate(self.trackers):
            if not t.owns(out.request_id) and len(t.scores) == self._num_scores[p]:
                continue
            for part in out.outputs:
                sample = t.samples.get((out.request_id, part.index))
                key = (p, out.request_id, part.index)
                if sample is None or not sample.finished or key in self._seen:
                    continue
                self._seen.add(key)
                if sample.finish_reason is not None and sample.finish_reason.value != "abort":
                    self.emit({"event": "candidate", "problem": p, "request_id": out.request_id, "index": part.index,
                               "answer": t.extract(sample.text), "num_tokens": len(sample.token_ids),
                               "finish_reason": sample.finish_reason.value})
            if len(t.scores) != self._num_scores[p]:
                for key_, score in list(t.scores.items())[self._num_scores[p]:]:
                    self.emit({"event": "score", "problem": p, "key": key_, "score": score})
                self._num_scores[p] = len(t.scores)

    @property
    def done(self) -> bool:
        return bool(self.inner.done)

    def cancel(self, engine: Engine) -> None:
        self.inner.cancel(engine)

    def result(self) -> Any:
        result = self.inner.result()
        for r in result if isinstance(result, list) else [result]:
            self.emit({"event": "selection", "answer": r.answer, "selected": list(r.selected)})
        return result
