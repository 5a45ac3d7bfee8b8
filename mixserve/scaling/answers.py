"""Answer extraction and canonicalisation for voting (pure string functions).

Extractors by name (`EXTRACTORS`, selectable over HTTP with the `extractor` field):
- `auto` (default): `\\boxed{x}`, else the last "Answer: x" / "answer is x" line, else the last number.
- `number`: the last number (after the last answer marker when there is one).
- `boxed`: the last `\\boxed{...}` (nested braces allowed).
- `answer_line`: the last "Answer:" / "final answer is" marker, rest of that line.
- `choice`: a multiple-choice letter A-J ("(B)", "Answer: C", "the answer is d").
Every extractor returns a canonical answer (`canonical`) or None.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from fractions import Fraction

from mixserve.scaling.base import ScalingError

Extractor = Callable[[str], str | None]
"""Completion text -> canonical answer (None: no answer found)."""

_MARKED = re.compile(r"(?:final answer|answer)\s*(?:is|:|=)\s*:?\s*([^\n]*)", re.IGNORECASE)
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?(?:/\d+)?")
_PLAIN_NUMBER = re.compile(r"-?\d+(?:\.\d+)?(?:/\d+)?")
_QUOTES = "\"'`*$“”‘’«»"
_CHOICE = re.compile(r"^\(?([A-Ja-j])\)?(?:[.):,]|\s|$)")
_CHOICE_ANY = re.compile(r"\(([A-J])\)|\b([A-J])\b")


def canonical(answer: str) -> str:
    """Lower-case, strip spaces, quotes, markup and trailing punctuation; numbers in lowest terms
    ("3.0" -> "3", "1,000" -> "1000")."""
    text = answer.strip()
    previous = None
    while text != previous:
        previous = text
        text = text.strip().strip(_QUOTES).strip().rstrip(".,;:!").strip()
        if text.startswith("\\(") and text.endswith("\\)"):
            text = text[2:-2]
        if text.startswith("\\boxed{") and text.endswith("}"):
            text = text[7:-1]
    number = text.replace(",", "").replace(" ", "")
    if _PLAIN_NUMBER.fullmatch(number):
        try:
            value = Fraction(number)
        except (ValueError, ZeroDivisionError):
            return number
        return str(value.numerator) if value.denominator == 1 else f"{value.numerator}/{value.denominator}"
    return re.sub(r"\s+", " ", text.lower())


def boxed_contents(text: str) -> list[str]:
    """Every `\\boxed{...}` body, braces balanced (`\\boxed{\\frac{1}{2}}` -> `\\frac{1}{2}`)."""
    found = []
    start = text.find("\\boxed{")
    while start >= 0:
        i, depth = start + len("\\boxed{"), 1
        while i < len(text) and depth:
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            i += 1
        if depth == 0:
            found.append(text[start + len("\\boxed{"):i - 1])
        start = text.find("\\boxed{", i if depth == 0 else start + 1)
    return found


def extract_boxed(text: str) -> str | None:
    boxed = boxed_contents(text)
    return (canonical(boxed[-1]) or None) if boxed else None


def extract_answer_line(text: str) -> str | None:
    marked = [m for m in _MARKED.findall(text) if canonical(m)]
    return canonical(marked[-1]) if marked else None


def extract_number(text: str) -> str | None:
    marked = _MARKED.findall(text)
    for scope in ([marked[-1]] if marked else []) + [text]:
        numbers = _NUMBER.findall(scope)
        if numbers:
            return canonical(numbers[0] if scope is not text else numbers[-1])
    return None


def extract_choice(text: str) -> str | None:
    marked = _MARKED.findall(text)
    if marked:
        found = _CHOICE.match(marked[-1].strip().strip(_QUOTES))
        if found:
            return found.group(1).lower()
    lines = [ln.strip().strip(_QUOTES) for ln in text.strip().splitlines() if ln.strip()]
    if lines:
        found = _CHOICE.match(lines[-1])
        if found and (len(lines[-1]) <= 3 or lines[-1][1:2] in ").:"):
            return found.group(1).lower()
    letters = _CHOICE_ANY.findall(text)
    letters = [a or b for a, b in letters if (a or b) not in ("I",)]
    return letters[-1].lower() if letters else None


def extract_answer(text: str) -> str | None:
    """`\\boxed{x}`, else the last "answer: x" / "answer is x", else the last number, canonicalised."""
    return extract_boxed(text) or extract_answer_line(text) or extract_number(text)


EXTRACTORS: dict[str, Extractor] = {"auto": extract_answer, "number": extract_number, "boxed": extract_boxed,
                                    "answer_line": extract_answer_line, "choice": extract_choice}


def get_extractor(spec: str | Extractor | None) -> Extractor:
    """An extractor by name (`EXTRACTORS`), a callable, or None (the default `auto`)."""
    if spec is None:
        return extract_answer
    if callable(spec):
        return spec
    if spec not in EXTRACTORS:
        raise ScalingError(f"invalid extractor={spec!r}: known extractors are {', '.join(EXTRACTORS)}",
                           field="extractor")
    return EXTRACTORS[spec]
