"""Model-grouped batching: every job of one model runs in one batch, so each model loads at most once per
batch (Symbolic-MoE's "16 models on one GPU"); the per-question order is the baseline it is measured
against. Both run through the same `ModelPool`, so loads, switches and bytes come from its events."""

from __future__ import annotations

import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Any

from mixserve.mixture.experts import Expert, ExpertAnswer, ExpertRequest
from mixserve.mixture.pool import ModelPool

ExpertOf = Callable[[str, Any], Expert]
"""(model name, pool handle) -> an Expert over that handle."""


@dataclass(frozen=True)
class Job:
    key: Hashable
    """Where the answer goes (e.g. (question id, slot))."""
    model: str
    request: ExpertRequest


@dataclass
class ModelCompute:
    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    seconds: float = 0.0


@dataclass
class BatchReport:
    """What one batch cost: loads, model switches, bytes loaded, seconds, per-model compute."""

    loads: int = 0
    evictions: int = 0
    switches: int = 0
    """How many times the running model changed (the first model counts as one)."""
    bytes_loaded: int = 0
    load_seconds: float = 0.0
    wall_seconds: float = 0.0
    compute: dict[str, ModelCompute] = field(default_factory=dict)

    def add(self, other: BatchReport) -> None:
        self.loads += other.loads
        self.evictions += other.evictions
        self.switches += other.switches
        self.bytes_loaded += other.bytes_loaded
        self.load_seconds += other.load_seconds
        self.wall_seconds += other.wall_seconds
        for m, c in other.compute.items():
            mine = self.compute.setdefault(m, ModelCompute())
            mine.requests += c.requests
            mine.prompt_tokens += c.prompt_tokens
            mine.completion_tokens += c.completion_tokens
            mine.seconds += c.seconds

    def as_dict(self) -> dict[str, Any]:
        return {"loads": self.loads, "evictions": self.evictions, "switches": self.switches,
                "bytes_loaded": self.bytes_loaded, "load_seconds": round(self.load_seconds, 4),
                "wall_seconds": round(self.wall_seconds, 4),
                "compute": {m: vars(c) for m, c in self.compute.items()}}


def group_by_model(jobs: list[Job], resident_first: list[str] | None = None) -> list[tuple[str, list[Job]]]:
    """Jobs grouped by model, models in first-appearance order, already-resident models first (no load)."""
    groups: dict[str, list[Job]] = {}
    for job in jobs:
        groups.setdefault(job.model, []).append(job)
    first = [m for m in (resident_first or []) if m in groups]
    order = first + [m for m in groups if m not in first]
    return [(m, groups[m]) for m in order]


def run_grouped(jobs: list[Job], pool: ModelPool[Any], expert_of: ExpertOf) -> tuple[dict[Hashable, ExpertAnswer],
                                                                                    BatchReport]:
    """Each model's jobs in one batch; each model acquired once."""
    resident = [m for m in pool.names if pool.state(m) == "loaded"]
    return _run([(m, g) for m, g in group_by_model(jobs, resident)], pool, expert_of)


def run_per_question(jobs: list[Job], pool: ModelPool[Any], expert_of: ExpertOf) -> tuple[
        dict[Hashable, ExpertAnswer], BatchReport]:
    """Baseline: jobs one at a time in the given order (a model switch whenever the next job's model differs)."""
    return _run([(j.model, [j]) for j in jobs], pool, expert_of)


def _run(groups: list[tuple[str, list[Job]]], pool: ModelPool[Any], expert_of: ExpertOf) -> tuple[
        dict[Hashable, ExpertAnswer], BatchReport]:
    report = BatchReport()
    first_event = len(pool.events)
    start = time.perf_counter()
    answers: dict[Hashable, ExpertAnswer] = {}
    previous: str | None = None
    for model, group in groups:
        if model != previous:
            report.switches += 1
            previous = model
        with pool.use(model) as handle:
            t0 = time.perf_counter()
            outs = expert_of(model, handle).generate([j.request for j in group])
            compute = report.compute.setdefault(model, ModelCompute())
            compute.seconds += time.perf_counter() - t0
        for job, out in zip(group, outs, strict=True):
            answers[job.key] = out
            compute.requests += 1
            compute.prompt_tokens += out.prompt_tokens
            compute.completion_tokens += out.completion_tokens
    report.wall_seconds = time.perf_counter() - start
    for event in pool.events[first_event:]:
        if event.kind == "load":
            report.loads += 1
            report.bytes_loaded += event.nbytes
            report.load_seconds += event.seconds
        elif event.kind == "evict":
            report.evictions += 1
    return answers, report
