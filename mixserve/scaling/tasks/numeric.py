"""Numeric tasks with one canonical answer: arithmetic, chain sums, sorting, gcd and lcm."""

from __future__ import annotations

import math
import random

from mixserve.scaling.tasks.base import Problem, check_count, check_difficulty, extract_int_list, extract_integer

FORMAT = "Give the final answer on the last line as 'Answer: <number>'."


class _IntegerTask:
    """Shared: integer answers, exact comparison, no process reward."""

    name = "integer"

    def extract(self, text: str) -> str | None:
        return extract_integer(text)

    def check(self, problem: Problem, answer: str | None) -> bool:
        return answer is not None and answer == problem.reference

    def process_score(self, problem: Problem, partial: str) -> float | None:
        return None

    def generate(self, num_problems: int, seed: int, difficulty: int) -> list[Problem]:
        check_count(num_problems)
        check_difficulty(difficulty)
        rng = random.Random(f"{self.name}:{seed}:{difficulty}")
        return [self._one(rng, i, difficulty) for i in range(num_problems)]

    def _one(self, rng: random.Random, index: int, difficulty: int) -> Problem:
        raise NotImplementedError


class Arithmetic(_IntegerTask):
    """a op b with `difficulty` digits per operand (op in +, -, *)."""

    name = "arithmetic"

    def _one(self, rng: random.Random, index: int, difficulty: int) -> Problem:
        lo, hi = 10 ** (difficulty - 1), 10**difficulty - 1
        a, b, op = rng.randint(lo, hi), rng.randint(lo, hi), rng.choice("+-*")
        value = a + b if op == "+" else a - b if op == "-" else a * b
        return Problem(self.name, index, f"What is {a} {op} {b}? {FORMAT}", str(value), {"a": a, "b": b, "op": op})


class ChainSum(_IntegerTask):
    """A sum/difference of `difficulty + 2` terms of up to `1 + difficulty // 2` digits."""

    name = "chain_sum"

    def _one(self, rng: random.Random, index: int, difficulty: int) -> Problem:
        hi = 10 ** (1 + difficulty // 2) - 1
        terms = [rng.randint(1, hi) for _ in range(difficulty + 2)]
        ops = [rng.choice("+-") for _ in terms[1:]]
        expr = str(terms[0]) + "".join(f" {o} {t}" for o, t in zip(ops, terms[1:], strict=True))
        value = terms[0] + sum(t if o == "+" else -t for o, t in zip(ops, terms[1:], strict=True))
        return Problem(self.name, index, f"Compute {expr}. {FORMAT}", str(value), {"terms": terms, "ops": ops})


class Gcd(_IntegerTask):
    """gcd(a, b) of two `difficulty + 1`-digit numbers built with a non-trivial common factor."""

    name = "gcd"

    def _one(self, rng: random.Random, index: int, difficulty: int) -> Problem:
        g = rng.randint(2, 9 * difficulty)
        hi = 10 ** (difficulty + 1) // g
        a, b = g * rng.randint(2, hi), g * rng.randint(2, hi)
        return Problem(self.name, index, f"What is the greatest common divisor of {a} and {b}? {FORMAT}",
                       str(math.gcd(a, b)), {"a": a, "b": b})


class Lcm(_IntegerTask):
    """lcm(a, b) with a, b up to 4 * 10**difficulty // 4 (small enough to multiply out)."""

    name = "lcm"

    def _one(self, rng: random.Random, index: int, difficulty: int) -> Problem:
        hi = 3 * 4**difficulty
        a, b = rng.randint(2, hi), rng.randint(2, hi)
        return Problem(self.name, index, f"What is the least common multiple of {a} and {b}? {FORMAT}",
                       str(math.lcm(a, b)), {"a": a, "b": b})


class Sorting(_IntegerTask):
    """Sort `difficulty + 2` integers in [-99, 99] ascending; the answer is the whole list."""

    name = "sorting"

    def extract(self, text: str) -> str | None:
        return extract_int_list(text)

    def _one(self, rng: random.Random, index: int, difficulty: int) -> Problem:
        values = [rng.randint(-99, 99) for _ in range(difficulty + 2)]
        shown = ", ".join(map(str, values))
        return Problem(self.name, index,
                       f"Sort these numbers in ascending order: {shown}. Give the final answer on the last "
                       f"line as 'Answer: <numbers separated by commas>'.",
                       ",".join(map(str, sorted(values))), {"values": values})
