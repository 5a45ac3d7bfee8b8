"""First-finish search (Agarwal et al. 2025): start N samples, return the first that finishes and
abort the rest (shorter reasoning traces are more often right, and the wait is the shortest one)."""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

from mixserve.scaling.base import Candidate, ScaleConfig, ScaleResult
from mixserve.scaling.tracker import Tracker

if TYPE_CHECKING:
    from mixserve.engine.engine import Engine
    from mixserve.outputs import RequestOutput


class FirstFinish:
    name = "ffs"

    def __init__(self, tracker: Tracker, config: ScaleConfig) -> None:
        self.t = tracker
        self.config = config
        self.winner: Candidate | None = None
        self._cancelled = False

    @property
    def controller_id(self) -> str:
        return self.t.strategy_id

    def owns(self, request_id: str) -> bool:
        return self.t.owns(request_id)

    def start(self, engine: Engine) -> None:
        request_id = self.t.started(self.t.new_id("s"))
        engine.add_request(request_id, list(self.t.prompt_ids), replace(self.config.params, n=self.config.budget))

    def on_output(self, engine: Engine, out: RequestOutput) -> None:
        if self.done:
            return
        finished = self.t.route(engine, out)
        if finished:
            self.winner = self.t.candidate(0, finished[0])
            self.t.abort(engine, out.request_id)

    @property
    def done(self) -> bool:
        return self._cancelled or self.winner is not None

    def cancel(self, engine: Engine) -> None:
        self.t.cancel(engine)
        self._cancelled = True

    def result(self) -> ScaleResult:
        w = self.winner
        cands = (w,) if w is not None else ()
        return ScaleResult(self.name, w.answer if w else None, w.text if w else "", (0,) if w else (), cands,
                           self.t.ledger.usage(), {"num_samples": len(cands)})
