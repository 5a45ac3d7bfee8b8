"""Answer extraction and checking for mixture questions (the scaling task suite's verifiers)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from mixserve.mixture.experts import Question
from mixserve.scaling.tasks import Problem, get_task
from mixserve.scaling.tasks.base import marked_answer


class Grader(Protocol):
    def extract(self, question: Question, text: str) -> str | None: ...

    def check(self, question: Question, answer: str | None) -> bool: ...


class TaskGrader:
    """Questions made from scaling-task problems: that task's extractor and strict checker."""

    def extract(self, question: Question, text: str) -> str | None:
        if question.task is None:
            return marked_answer(text)
        return get_task(question.task).extract(text)

    def check(self, question: Question, answer: str | None) -> bool:
        problem = question.problem
        if isinstance(problem, Problem):
            return get_task(problem.task).check(problem, answer)
        return answer is not None and answer == question.reference

    def right(self, question: Question, text: str) -> bool:
        return self.check(question, self.extract(question, text))


def question_id(problem: Problem) -> str:
    return f"{problem.task}-{problem.index}"


def questions_from(problems: Sequence[Problem]) -> list[Question]:
    return [Question(question_id(p), p.question, p.reference, p.task, p) for p in problems]


def mixed_problems(tasks: Sequence[str], per_task: int, seed: int, difficulty: int) -> list[Problem]:
    """`per_task` problems of each task, interleaved (a mixed-skill set)."""
    per = [get_task(t).generate(per_task, seed, difficulty) for t in tasks]
    return [p for i in range(per_task) for ps in per for p in ps[i:i + 1]]
