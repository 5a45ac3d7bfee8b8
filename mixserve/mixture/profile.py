"""`mixserve mixture profile`: keywords of a validation set, every model's answers to it (each model loaded
once), profiles `model -> keyword -> score`, measured costs, and the aggregator chosen by the synthetic
aggregation benchmark."""

from __future__ import annotations

import random
from typing import Any

from mixserve.mixture.aggregate import aggregation_benchmark
from mixserve.mixture.experts import ExpertRequest, Question
from mixserve.mixture.grading import TaskGrader
from mixserve.mixture.pool import ModelPool
from mixserve.mixture.profiles import ModelCost, Profiles, build_profiles
from mixserve.mixture.schedule import BatchReport, ExpertOf, Job, run_grouped
from mixserve.mixture.skills import KeywordExtractor


def profile_models(pool: ModelPool[Any], expert_of: ExpertOf, questions: list[Question], grader: TaskGrader,
                   extractor_config: Any, annotator: str, seed: int = 0,
                   aggregator_candidates: list[str] | None = None) -> tuple[Profiles, dict[str, list[str]],
                                                                            BatchReport]:
    """Profiles of every pool model on `questions`; also returns each question's keywords."""
    report = BatchReport()
    with pool.use(annotator) as handle:
        keywords = KeywordExtractor(expert_of(annotator, handle), extractor_config).extract(questions)
    by_qid = {q.qid: kws for q, kws in zip(questions, keywords, strict=True)}
    models = pool.names
    jobs = [Job((q.qid, m), m, ExpertRequest(q, q.text, "solve", seed=seed)) for m in models for q in questions]
    answers, solve_report = run_grouped(jobs, pool, expert_of)
    report.add(solve_report)
    records = []
    texts: dict[str, dict[str, list[str]]] = {}
    for q in questions:
        for m in models:
            text = answers[(q.qid, m)].text
            texts.setdefault(q.qid, {})[m] = [text]
            records.append((m, by_qid[q.qid], grader.right(q, text)))
    profiles = build_profiles(models, records)
    loaded_bytes = {e.model: e.nbytes for e in pool.events if e.kind == "load"}
    profiles.costs = {m: ModelCost(solve_report.compute[m].seconds / len(questions), loaded_bytes.get(m, 0))
                      for m in models}
    bench = aggregation_benchmark(questions, texts, grader.right, random.Random(seed))
    candidates = aggregator_candidates or models
    if bench:
        jobs = [Job((i, m), m, r) for m in candidates for i, r in enumerate(bench)]
        agg, agg_report = run_grouped(jobs, pool, expert_of)
        report.add(agg_report)
        profiles.aggregator_scores = {m: sum(grader.right(r.question, agg[(i, m)].text)
                                             for i, r in enumerate(bench)) / len(bench) for m in candidates}
        profiles.aggregator = max(candidates, key=lambda m: profiles.aggregator_scores[m])
    return profiles, by_qid, report
