"""Recorded predictions, replayed: a predictor's guesses on one model, driving the provider of another.

`TraceReplay` (trace.py) moves a real model's routing onto a bigger model of the same E and top-k (the
random-initialised OLMoE-shaped model of the budget benchmark). Its predictors cannot come along as they
are: the bigger model's hidden states are random, so a router lookahead or a fitted gate would guess from
noise. `PredictionTrace` keeps, per step, what a predictor said on the real model (target MoE layer ->
ranked expert ids), and `ReplayedPredictor` says it again at the same step and layer, so the budget run
sees the real predictor's recall with the bigger model's expert sizes and read times.

A per-layer predictor (router lookahead, ahead gate) is replayed through `predict` (the guess for layer
T is made at the MoE layer before T); an all-at-once one (pre-gate) through `predict_step`, at the
first MoE layer. Steps advance at the first MoE layer of each forward pass.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch


@dataclass
class PredictionTrace:
    """What one predictor named, per forward pass: target MoE layer -> ranked expert ids."""

    name: str
    """The predictor (e.g. `gate`, `pregate`, `lookahead`)."""
    all_at_once: bool
    """True: every layer predicted at the first MoE layer (pre-gate); False: layer T at the layer before T."""
    steps: list[dict[int, list[int]]] = field(default_factory=list)

    def restrict(self, layer_ids: list[int]) -> PredictionTrace:
        """Only the predictions for `layer_ids` (a bigger model replaying the first layers of a trace)."""
        keep = set(layer_ids)
        return PredictionTrace(self.name, self.all_at_once,
                               [{t: ids for t, ids in s.items() if t in keep} for s in self.steps])

    def to_dict(self) -> dict[str, object]:
        return {"name": self.name, "all_at_once": self.all_at_once,
                "steps": [{str(t): ids for t, ids in s.items()} for s in self.steps]}

    @classmethod
    def from_dict(cls, data: dict[str, object]) -> PredictionTrace:
        steps = data["steps"]
        if not isinstance(steps, list):
            raise ValueError(f"prediction trace {data.get('name')!r}: 'steps' must be a list")
        return cls(str(data["name"]), bool(data["all_at_once"]),
                   [{int(t): [int(e) for e in ids] for t, ids in s.items()} for s in steps])


def save_predictions(traces: list[PredictionTrace], path: str | Path) -> None:
    Path(path).write_text(json.dumps([t.to_dict() for t in traces]))


def load_predictions(path: str | Path) -> dict[str, PredictionTrace]:
    """Name -> trace, from a file written by `save_predictions`."""
    return {t.name: t for t in (PredictionTrace.from_dict(d) for d in json.loads(Path(path).read_text()))}


class ReplayedPredictor:
    """An `ExpertPredictor` (per-layer traces) or `StepPredictor` (all-at-once traces) that repeats a
    `PredictionTrace`; ValueError naming the step when the run outlasts the recording."""

    def __init__(self, trace: PredictionTrace, layer_ids: list[int]) -> None:
        """`layer_ids`: the replaying model's MoE layers, in order (their ids must match the trace's)."""
        self.trace = trace
        self.layer_ids = list(layer_ids)
        self.next = dict(zip(self.layer_ids, self.layer_ids[1:]))
        self._known = set(self.layer_ids)
        self.step = -1

    def _current(self) -> dict[int, list[int]]:
        if self.step >= len(self.trace.steps):
            raise ValueError(f"prediction replay {self.trace.name!r}: step {self.step} asked, the trace has "
                             f"{len(self.trace.steps)}")
        return self.trace.steps[self.step]

    def predict_step(self, x: torch.Tensor) -> dict[int, list[int]]:
        self.step += 1
        return {t: ids for t, ids in self._current().items() if t in self._known}

    def predict(self, layer_idx: int, x: torch.Tensor, topk_ids: torch.Tensor) -> tuple[int, list[int]] | None:
        if layer_idx == self.layer_ids[0]:
            self.step += 1
        nxt = self.next.get(layer_idx)
        if nxt is None:
            return None
        ids = self._current().get(nxt)
        return None if ids is None else (nxt, ids)
