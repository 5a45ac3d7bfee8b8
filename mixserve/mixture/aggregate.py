"""Aggregation: the synthesis prompt, the synthetic aggregation benchmark that picks the aggregator per
task (one right and two wrong validation answers per question, shuffled), and answer extraction."""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence

from mixserve.mixture.experts import ExpertRequest, Question

AGGREGATE_PROMPT = """You have been provided with a set of responses from various models to the question below. \
Some of them may be wrong. Critically evaluate them and give a single, correct answer.

Question: {question}

Responses:
{responses}

Reply with the correct answer in the requested format."""


def _strip_thinking(text: str) -> str:
    return text.rsplit("</think>", 1)[-1].strip()


def aggregate_request(question: Question, candidates: Sequence[str], seed: int = 0) -> ExpertRequest:
    responses = "\n".join(f"{i}. {_strip_thinking(c)}" for i, c in enumerate(candidates, 1))
    return ExpertRequest(question, AGGREGATE_PROMPT.format(question=question.text, responses=responses),
                         "aggregate", seed=seed, candidates=tuple(candidates))


def aggregation_benchmark(questions: Sequence[Question], answers: dict[str, dict[str, list[str]]],
                          is_right: Callable[[Question, str], bool], rng: random.Random,
                          num_wrong: int = 2) -> list[ExpertRequest]:
    """For each question with a right and a wrong answer in the pool's outputs (`answers[qid][model] =
    [texts]`): one right + up to `num_wrong` wrong (the paper's 2; fewer only when a small pool has no
    more), shuffled, as an aggregate request."""
    requests = []
    for q in questions:
        texts = [t for per_model in answers.get(q.qid, {}).values() for t in per_model]
        right = [t for t in texts if is_right(q, t)]
        wrong = [t for t in texts if not is_right(q, t)]
        if not right or not wrong:
            continue
        picked = [rng.choice(right), *rng.sample(wrong, min(num_wrong, len(wrong)))]
        rng.shuffle(picked)
        requests.append(aggregate_request(q, picked))
    return requests
