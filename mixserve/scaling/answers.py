"""Answer extraction and canonicalisation for voting (pure string functions)."""

from __future__ import annotations

import re
from collections.abc import Callable
from fractions import Fraction

Extractor = Callable[[str], str | None]
"""Completion text -> canonical answer (None: no answer found)."""

_BOXED = re.compile(r"\\boxed\{([^{}]*)\}")
_MARKED = re.compile(r"(?:final answer|answer)\s*(?:is|:|=)\s*([^\n]+)", re.IGNORECASE)
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?(?:/\d+)?")


def canonical(answer: str) -> str:
    """Lower-case, strip spaces, markup and trailing punctuation; numbers in lowest terms ("3.0" -> "3")."""
    text = answer.strip().strip("*`$").strip().rstrip(".").strip()
    number = text.replace(",", "").replace(" ", "")
    if _NUMBER.fullmatch(number):
        try:
            value = Fraction(number)
        except (ValueError, ZeroDivisionError):
            return number
        return str(value.numerator) if value.denominator == 1 else f"{value.numerator}/{value.denominator}"
    return re.sub(r"\s+", " ", text.lower())


def extract_answer(text: str) -> str | None:
    """`\\boxed{x}`, else the last "answer: x" / "answer is x", else the last number, canonicalised."""
    boxed = _BOXED.findall(text)
    if boxed:
        return canonical(boxed[-1])
    marked = _MARKED.findall(text)
    if marked:
        found = canonical(marked[-1])
        return found or None
    numbers = _NUMBER.findall(text)
    if numbers:
        return canonical(numbers[-1])
    return None
