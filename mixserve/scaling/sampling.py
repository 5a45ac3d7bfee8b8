"""Sample N, (optionally) score, select: repeated sampling, majority, weighted vote, best-of-N,
Best-of-Majority and confidence selection are this controller with different selection rules.

All N samples are one engine request with `n = N`: the prompt is prefilled once and forked. With an
engine-backed verifier (the judge) samples pause when they finish, the judge forks from their KV,
and the sample is released right after.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING

from mixserve.scaling.base import Candidate, ScaleConfig, ScaleResult
from mixserve.scaling.tracker import Tracker

if TYPE_CHECKING:
    from mixserve.engine.engine import Engine
    from mixserve.outputs import RequestOutput

Selector = Callable[[list[Candidate]], tuple[int, ...]]


class SampleAndSelect:
    def __init__(self, name: str, tracker: Tracker, config: ScaleConfig, select: Selector,
                 logprobs: int | None = None, return_all: bool = False) -> None:
        self.name = name
        self.t = tracker
        self.config = config
        self.select = select
        self.logprobs = logprobs
        self.return_all = return_all
        self.candidates: dict[int, Candidate] = {}
        self.keys: dict[int, str] = {}
        self._cancelled = False

    @property
    def controller_id(self) -> str:
        return self.t.strategy_id

    def owns(self, request_id: str) -> bool:
        return self.t.owns(request_id)

    def start(self, engine: Engine) -> None:
        params = replace(self.config.params, n=self.config.budget,
                         logprobs=self.logprobs if self.logprobs is not None else self.config.params.logprobs)
        verifier = self.t.verifier
        pause = verifier is not None and verifier.needs_context
        engine.add_request(self.t.started(self.t.new_id("s")), list(self.t.prompt_ids), params,
                           pause_on_finish=pause)

    def on_output(self, engine: Engine, out: RequestOutput) -> None:
        for sample in self.t.route(engine, out):
            index = sample.index
            self.candidates[index] = self.t.candidate(index, sample)
            if self.t.verifier is None:
                continue
            key = self.keys[index] = f"{self.controller_id}/k{index}"
            source = (sample.request_id, index) if self.t.verifier.needs_context else None
            self.t.score(engine, key, sample.text, True, [*self.t.prompt_ids, *sample.token_ids], source)
            if source is not None:
                engine.release_request(*source)

    @property
    def done(self) -> bool:
        return self._cancelled or (len(self.candidates) == self.config.budget and not self.t.pending)

    def cancel(self, engine: Engine) -> None:
        self.t.cancel(engine)
        self._cancelled = True

    def result(self) -> ScaleResult:
        cands = [self._scored(i) for i in sorted(self.candidates)]
        selected = tuple(c.index for c in cands) if self.return_all else self.select(cands)
        best = self.candidates_by_index(cands, selected)
        info: dict[str, float | int | str] = {"num_samples": len(cands)}
        if self.t.verifier is not None:
            info["num_verified"] = sum(1 for c in cands if (c.score or 0.0) >= 0.5)
        return ScaleResult(self.name, best.answer if best else None, best.text if best else "", selected,
                           tuple(cands), self.t.ledger.usage(), info)

    def _scored(self, index: int) -> Candidate:
        cand = self.candidates[index]
        key = self.keys.get(index)
        return replace(cand, score=self.t.scores.get(key)) if key else cand

    @staticmethod
    def candidates_by_index(cands: Sequence[Candidate], selected: tuple[int, ...]) -> Candidate | None:
        by_index = {c.index: c for c in cands}
        return by_index.get(selected[0]) if selected else None
