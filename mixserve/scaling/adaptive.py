"""Adaptive self-consistency: sample in doubling waves, stop as soon as the vote is settled, cancel
whatever is still pending. Later waves reuse the prompt's full blocks from the prefix cache.

Stop rules on the top two answer counts v1 >= v2:
- beta (Aggarwal et al. 2023; its_hub BetaSelfConsistency): with a uniform prior, the chance that the
  leader's share exceeds 1/2 is P = 1 - I_0.5(v1 + 1, v2 + 1) = P(Binomial(v1 + v2 + 1, 1/2) <= v1);
  stop when P >= confidence.
- supermajority: stop when v1 >= supermajority * (answered samples) and at least 2 samples voted.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import replace
from typing import TYPE_CHECKING

from mixserve.scaling.base import Candidate, ScaleConfig, ScaleResult
from mixserve.scaling.select import majority
from mixserve.scaling.tracker import Tracker

if TYPE_CHECKING:
    from mixserve.engine.engine import Engine
    from mixserve.outputs import RequestOutput


def beta_stay_probability(v1: int, v2: int) -> float:
    """P(p > 1/2) for p ~ Beta(v1 + 1, v2 + 1), exactly, via the binomial identity."""
    n = v1 + v2 + 1
    return sum(math.comb(n, i) for i in range(v1 + 1)) / 2**n


def should_stop(answers: list[str | None], config: ScaleConfig) -> bool:
    counts = sorted(Counter(a for a in answers if a is not None).values(), reverse=True)
    if not counts:
        return False
    v1, v2 = counts[0], counts[1] if len(counts) > 1 else 0
    if config.adaptive_rule == "beta":
        return beta_stay_probability(v1, v2) >= config.adaptive_confidence
    return v1 >= 2 and v1 >= config.supermajority * sum(counts)


class AdaptiveConsistency:
    name = "adaptive"

    def __init__(self, tracker: Tracker, config: ScaleConfig) -> None:
        self.t = tracker
        self.config = config
        self.launched: dict[str, int] = {}
        self.candidates: list[Candidate] = []
        self.stopped = False
        self._cancelled = False

    @property
    def controller_id(self) -> str:
        return self.t.strategy_id

    def owns(self, request_id: str) -> bool:
        return self.t.owns(request_id)

    @property
    def num_launched(self) -> int:
        return sum(self.launched.values())

    def start(self, engine: Engine) -> None:
        self._launch(engine, min(self.config.adaptive_first_wave, self.config.budget))

    def _launch(self, engine: Engine, n: int) -> None:
        request_id = self.t.started(self.t.new_id("w"))
        params = replace(self.config.params, n=n,
                         seed=None if self.config.params.seed is None else self.config.params.seed + len(self.launched))
        engine.add_request(request_id, list(self.t.prompt_ids), params)
        self.launched[request_id] = n

    def on_output(self, engine: Engine, out: RequestOutput) -> None:
        if self.done:
            return
        for sample in self.t.route(engine, out):
            self.candidates.append(self.t.candidate(len(self.candidates), sample))
            if should_stop([c.answer for c in self.candidates], self.config):
                self.stopped = True
                for request_id in self.launched:
                    self.t.abort(engine, request_id)
                return
        if len(self.candidates) == self.num_launched and self.num_launched < self.config.budget:
            self._launch(engine, min(self.num_launched, self.config.budget - self.num_launched))

    @property
    def done(self) -> bool:
        finished_all = len(self.candidates) == self.num_launched == self.config.budget
        return self._cancelled or self.stopped or finished_all

    def cancel(self, engine: Engine) -> None:
        self.t.cancel(engine)
        self._cancelled = True

    def result(self) -> ScaleResult:
        selected = majority(self.candidates)
        best = self.candidates[selected[0]] if selected else None
        return ScaleResult(self.name, best.answer if best else None, best.text if best else "", selected,
                           tuple(self.candidates), self.t.ledger.usage(),
                           {"num_samples": len(self.candidates), "num_launched": self.num_launched,
                            "stopped_early": int(self.stopped and len(self.candidates) < self.config.budget)})
