"""A mixture over a model pool: keywords -> recruitment -> grouped expert runs -> aggregation, plus the
baselines it is compared with (single model, random k, majority across models, Mixture-of-Agents).

Every method runs its expert work through `run_grouped` (or `run_per_question` when asked), so the
reported loads, switches and bytes are the pool's own.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Any, Literal

from mixserve.config import ConfigError
from mixserve.mixture.aggregate import aggregate_request
from mixserve.mixture.experts import ExpertAnswer, ExpertRequest, Question, majority
from mixserve.mixture.grading import Grader
from mixserve.mixture.pool import ModelPool
from mixserve.mixture.profiles import Profiles
from mixserve.mixture.recruit import RecruitConfig, recruit
from mixserve.mixture.schedule import BatchReport, ExpertOf, Job, run_grouped, run_per_question
from mixserve.mixture.skills import KeywordExtractor, KeywordMapper, SkillConfig

Method = Literal["symbolic", "single", "random", "majority", "moa"]
METHODS: tuple[str, ...] = ("symbolic", "single", "random", "majority", "moa")
Scheduling = Literal["grouped", "per-question"]
Aggregation = Literal["aggregator", "skip-on-agreement", "majority"]
AGGREGATIONS: tuple[str, ...] = ("aggregator", "skip-on-agreement", "majority")
Executor = Callable[[list[Job], Any, ExpertOf], tuple[dict[Hashable, ExpertAnswer], BatchReport]]


@dataclass(frozen=True)
class MixtureConfig:
    """How a mixture answers."""

    recruit: RecruitConfig = field(default_factory=RecruitConfig)
    seed: int = 0
    """Seeds recruitment draws and expert sampling."""
    aggregator: str | None = None
    """Aggregator model; None: the profiles' benchmark winner, else the most accurate model."""
    single: str | None = None
    """Model of the `single` method; None: the most accurate model in the profiles."""
    moa_layers: int = 2
    """Mixture-of-Agents: proposer layers before the aggregator."""
    moa_proposers: tuple[str, ...] = ()
    """Mixture-of-Agents proposers; empty: every model."""
    scheduling: Scheduling = "grouped"
    """grouped: each model's jobs in one batch; per-question: one job at a time (the baseline)."""
    aggregation: Aggregation = "aggregator"
    """How symbolic and random-k turn their k answers into one. `aggregator` (the paper and its released
    code): the aggregator model always synthesises, also when the k slots hold one model's samples.
    `skip-on-agreement` (MOSAIC): when every slot's extracted answer is the same, that answer is final and
    the aggregator runs only for the other questions. `majority`: the majority vote over the k answers (the
    side metric the released code reports), no aggregator. Mixture-of-Agents always aggregates."""

    def __post_init__(self) -> None:
        if self.moa_layers < 1:
            raise ConfigError(f"invalid config moa_layers={self.moa_layers!r}: must be >= 1", field="moa_layers")
        if self.scheduling not in ("grouped", "per-question"):
            raise ConfigError(f"invalid config scheduling={self.scheduling!r}: grouped or per-question",
                              field="scheduling")
        if self.aggregation not in AGGREGATIONS:
            raise ConfigError(f"invalid config aggregation={self.aggregation!r}: one of {', '.join(AGGREGATIONS)}",
                              field="aggregation")


@dataclass
class QuestionResult:
    question: Question
    keywords: list[str] = field(default_factory=list)
    recruited: list[str] = field(default_factory=list)
    answers: list[str] = field(default_factory=list)
    final: str = ""
    answer: str | None = None
    correct: bool | None = None
    aggregated: bool = False
    """Whether the aggregator model produced `final` (False: a vote or the agreeing experts)."""


@dataclass
class MixtureRun:
    method: str
    results: list[QuestionResult]
    report: BatchReport
    stages: dict[str, BatchReport]

    @property
    def accuracy(self) -> float:
        graded = [r.correct for r in self.results if r.correct is not None]
        return sum(graded) / len(graded) if graded else float("nan")


class Mixture:
    def __init__(self, pool: ModelPool[Any], expert_of: ExpertOf, profiles: Profiles, grader: Grader,
                 config: MixtureConfig = MixtureConfig(), skills: SkillConfig | None = None,
                 mapper: KeywordMapper | None = None, annotator: str | None = None,
                 executor: Executor | None = None) -> None:
        unknown = [m for m in profiles.models if m not in pool.names]
        if unknown:
            raise ConfigError(f"profiles name models the pool does not have: {unknown} (pool: {pool.names})",
                              field="profiles")
        self.pool, self.expert_of, self.profiles, self.grader = pool, expert_of, profiles, grader
        self.config, self.skills, self.mapper = config, skills or SkillConfig(), mapper
        self.annotator = annotator or profiles.models[0]
        self.executor = executor
        """Runs a batch of jobs grouped by model instead of `run_grouped` (the cluster's pool replicas)."""

    # -- choices ------------------------------------------------------------------------------
    def aggregator(self) -> str:
        return self.config.aggregator or self.profiles.aggregator or self.best_model()

    def best_model(self) -> str:
        acc = self.profiles.accuracy
        return max(self.profiles.models, key=lambda m: acc.get(m, 0.0))

    # -- stages -------------------------------------------------------------------------------
    def _execute(self, jobs: list[Job]) -> tuple[dict[Hashable, ExpertAnswer], BatchReport]:
        run = (self.executor or run_grouped) if self.config.scheduling == "grouped" else run_per_question
        return run(jobs, self.pool, self.expert_of)

    def keywords(self, questions: list[Question]) -> tuple[list[list[str]], BatchReport]:
        """Extracted (self-consistent) keywords mapped onto the profiles' vocabulary (the annotator model
        loads once for all questions)."""
        start = time.perf_counter()
        report = BatchReport()
        with self.pool.use(self.annotator) as handle:
            raw = KeywordExtractor(self.expert_of(self.annotator, handle), self.skills).extract(questions)
        mapped = [self.mapper.map(kws) if self.mapper is not None else kws for kws in raw]
        report.wall_seconds = time.perf_counter() - start
        return mapped, report

    def _solve_jobs(self, results: list[QuestionResult], prompt_of: Any = None) -> BatchReport:
        jobs = [Job((i, s), m, ExpertRequest(r.question, prompt_of(r) if prompt_of else r.question.text,
                                             "solve", seed=self.config.seed * 1000 + s))
                for i, r in enumerate(results) for s, m in enumerate(r.recruited)]
        answers, report = self._execute(jobs)
        for i, r in enumerate(results):
            r.answers = [answers[(i, s)].text for s in range(len(r.recruited))]
        return report

    def _aggregate(self, results: list[QuestionResult], aggregator: str) -> BatchReport:
        jobs = [Job(i, aggregator, aggregate_request(r.question, r.answers, seed=self.config.seed))
                for i, r in enumerate(results)]
        answers, report = self._execute(jobs) if jobs else ({}, BatchReport())
        for i, r in enumerate(results):
            r.final = answers[i].text
            r.aggregated = True
            r.answer = self.grader.extract(r.question, r.final)
        return report

    def _vote(self, r: QuestionResult) -> None:
        r.answer = majority([self.grader.extract(r.question, a) for a in r.answers])
        r.final = next((a for a in r.answers if self.grader.extract(r.question, a) == r.answer), r.answers[0])

    def _agrees(self, r: QuestionResult) -> bool:
        extracted = {self.grader.extract(r.question, a) for a in r.answers}
        return len(extracted) == 1 and None not in extracted

    # -- methods ------------------------------------------------------------------------------
    def run(self, questions: list[Question], method: str, keywords: list[list[str]] | None = None) -> MixtureRun:
        """Answer `questions` with `method`; symbolic takes `keywords` (mapped, one list per question) from an
        earlier run instead of extracting them again (then its report has no keywords stage)."""
        if method not in METHODS:
            raise ConfigError(f"invalid method={method!r}: one of {', '.join(METHODS)}", field="method")
        results = [QuestionResult(q) for q in questions]
        stages: dict[str, BatchReport] = {}
        rng = random.Random(self.config.seed)
        k = self.config.recruit.k
        if method == "symbolic":
            if keywords is None:
                keywords, stages["keywords"] = self.keywords(questions)
            elif len(keywords) != len(questions):
                raise ConfigError(f"invalid keywords: {len(keywords)} lists for {len(questions)} questions",
                                  field="keywords")
            for r, kws in zip(results, keywords, strict=True):
                r.keywords = kws
                r.recruited = recruit(self.profiles, kws, rng, self.config.recruit)
        elif method == "single":
            single = self.config.single or self.best_model()
            for r in results:
                r.recruited = [single]
        elif method == "random":
            for r in results:
                r.recruited = rng.choices(self.profiles.models, k=k)
        else:  # majority, moa: every model (or the MoA proposers)
            proposers = list(self.config.moa_proposers) if method == "moa" else []
            for r in results:
                r.recruited = proposers or self.profiles.models
        stages["experts"] = self._solve_jobs(results)
        if method == "moa":
            for layer in range(1, self.config.moa_layers):
                stages[f"moa_layer{layer + 1}"] = self._solve_jobs(
                    results, lambda r: aggregate_request(r.question, r.answers).prompt)
        mode = self.config.aggregation if method in ("symbolic", "random") else "aggregator"
        if method in ("symbolic", "random", "moa") and mode != "majority":
            todo = []
            for r in results:
                if mode == "skip-on-agreement" and self._agrees(r):
                    self._vote(r)
                else:
                    todo.append(r)
            stages["aggregate"] = self._aggregate(todo, self.aggregator())
        else:
            for r in results:
                self._vote(r)
        for r in results:
            if r.question.reference is not None:
                r.correct = self.grader.check(r.question, r.answer)
        total = BatchReport()
        for stage in stages.values():
            total.add(stage)
        return MixtureRun(method, results, total, stages)
