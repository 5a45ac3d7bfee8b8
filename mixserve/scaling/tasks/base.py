"""Procedurally generated tasks with strict binary verifiers (and, where one exists, an exact
process reward). Problems come from a seed and a difficulty knob (1 = easiest ... 5 = hardest)."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol

from mixserve.scaling.answers import canonical
from mixserve.scaling.base import ScalingError

MIN_DIFFICULTY, MAX_DIFFICULTY = 1, 5
_MARKED = re.compile(r"answer\s*(?:is|:|=)\s*([^\n]+)", re.IGNORECASE)
_INT = re.compile(r"-?\d+")


@dataclass(frozen=True)
class Problem:
    task: str
    index: int
    question: str
    """The prompt text (with the answer-format instruction)."""
    reference: str
    """One canonical correct answer (countdown tasks accept others too)."""
    data: Mapping[str, object] = field(default_factory=dict)


class Task(Protocol):
    @property
    def name(self) -> str: ...

    def generate(self, num_problems: int, seed: int, difficulty: int) -> list[Problem]: ...

    def extract(self, text: str) -> str | None:
        """Completion text -> canonical answer (what majority voting compares)."""

    def check(self, problem: Problem, answer: str | None) -> bool:
        """Strict: True only for a fully correct answer."""

    def process_score(self, problem: Problem, partial: str) -> float | None:
        """Exact process reward of a partial solution (1: can still succeed), or None if none exists."""


def check_difficulty(difficulty: int) -> None:
    if not isinstance(difficulty, int) or not MIN_DIFFICULTY <= difficulty <= MAX_DIFFICULTY:
        raise ScalingError(f"invalid difficulty={difficulty!r}: must be an integer in "
                           f"[{MIN_DIFFICULTY}, {MAX_DIFFICULTY}]", field="difficulty")


def check_count(num_problems: int) -> None:
    if not isinstance(num_problems, int) or num_problems < 1:
        raise ScalingError(f"invalid num_problems={num_problems!r}: must be an integer >= 1", field="num_problems")


def marked_answer(text: str) -> str | None:
    """The text after the last "Answer:" (or "answer is"), else None."""
    found = _MARKED.findall(text)
    return found[-1].strip() if found else None


def extract_integer(text: str) -> str | None:
    """The integer after the last "Answer:", else the last integer in the text."""
    marked = marked_answer(text)
    pool = _INT.findall(marked.replace(",", "")) if marked else []
    if not pool:
        pool = _INT.findall(text.replace(",", ""))
    return canonical(pool[0] if marked and pool else pool[-1]) if pool else None


def extract_int_list(text: str) -> str | None:
    """The integers after the last "Answer:" (else on the last non-empty line), as "a,b,c"."""
    marked = marked_answer(text)
    if marked is None:
        lines = [ln for ln in text.strip().splitlines() if ln.strip()]
        marked = lines[-1] if lines else ""
    values = _INT.findall(marked)
    return ",".join(str(int(v)) for v in values) if values else None
