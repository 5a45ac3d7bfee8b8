"""Countdown / 24: reach a target with + - * / using each given number at most once.

`countdown`: the answer is one expression, checked with a safe AST walk over exact `Fraction`s and
a multiset check on the numbers used. `countdown_steps` (planning): the answer is a sequence of steps
"a op b = c", one per line, each combining two available numbers into a new one (positive integers
only, division only when exact); solved when a step produces the target. Its exact process reward
is whether the partial state can still reach the target (`solvable`, brute force with memo).
"""

from __future__ import annotations

import ast
import random
import re
from collections import Counter
from fractions import Fraction
from functools import lru_cache

from mixserve.scaling.tasks.base import Problem, check_count, check_difficulty, marked_answer

_STEP = re.compile(r"(\d+)\s*([-+*/x×])\s*(\d+)\s*=\s*(\d+)")
_OPS = {ast.Add: lambda a, b: a + b, ast.Sub: lambda a, b: a - b, ast.Mult: lambda a, b: a * b,
        ast.Div: lambda a, b: a / b}


def combine(a: int, b: int) -> list[tuple[str, int]]:
    """Countdown moves on a pair: positive integer results only."""
    out = [("+", a + b), ("*", a * b)]
    hi, lo = max(a, b), min(a, b)
    if hi > lo:
        out.append(("-", hi - lo))
    if lo > 0 and hi % lo == 0:
        out.append(("/", hi // lo))
    return out


@lru_cache(maxsize=200_000)
def solvable(numbers: tuple[int, ...], target: int) -> bool:
    """Can some steps over `numbers` (sorted, each used at most once) produce `target`?"""
    if target in numbers:
        return True
    for i in range(len(numbers)):
        for j in range(i + 1, len(numbers)):
            rest = numbers[:i] + numbers[i + 1:j] + numbers[j + 1:]
            for _, value in combine(numbers[i], numbers[j]):
                if solvable(tuple(sorted(rest + (value,))), target):
                    return True
    return False


def _generate(name: str, num_problems: int, seed: int, difficulty: int) -> list[Problem]:
    check_count(num_problems)
    check_difficulty(difficulty)
    rng = random.Random(f"{name}:{seed}:{difficulty}")
    count = min(difficulty + 2, 6)
    problems: list[Problem] = []
    while len(problems) < num_problems:
        numbers = [rng.randint(1, 13 if difficulty <= 2 else 25) for _ in range(count)]
        pool: list[tuple[int, str]] = [(n, str(n)) for n in numbers]
        steps = []
        for _ in range(rng.randint(max(1, count - 2), count - 1)):  # a random plan builds the target
            x, y = sorted(rng.sample(pool, 2), reverse=True)
            pool.remove(x)
            pool.remove(y)
            op, value = rng.choice(combine(x[0], y[0]))
            pool.append((value, f"({x[1]} {op} {y[1]})"))
            steps.append(f"{x[0]} {op} {y[0]} = {value}")
        target, expr = pool[-1]
        if target in numbers or target > 999:
            continue
        reference = expr[1:-1] if name == "countdown" else "\n".join(steps)
        problems.append(Problem(name, len(problems), _question(name, numbers, target), reference,
                                {"numbers": tuple(numbers), "target": target, "plan": tuple(steps)}))
    return problems


def _question(name: str, numbers: list[int], target: int) -> str:
    shown = " ".join(map(str, numbers))
    if name == "countdown":
        return (f"Using the numbers {shown} (each at most once) and + - * /, make {target}. Give the final "
                f"answer on the last line as 'Answer: <expression>'.")
    return (f"Numbers: {shown}. Target: {target}. Combine two available numbers per step, one step per line "
            f"as 'a op b = c' (c replaces a and b), until you make the target.")


def eval_expression(text: str, numbers: tuple[int, ...]) -> Fraction | None:
    """Exact value of an expression using only + - * /, parentheses and numbers from `numbers`
    (each at most once); None if it is malformed, uses anything else, or divides by zero."""
    try:
        tree = ast.parse(text.replace("×", "*").replace("x", "*"), mode="eval")
    except SyntaxError:
        return None
    used: list[int] = []

    def walk(node: ast.AST) -> Fraction:
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            return _OPS[type(node.op)](walk(node.left), walk(node.right))
        if isinstance(node, ast.Constant) and type(node.value) is int:
            used.append(node.value)
            return Fraction(node.value)
        raise ValueError("not allowed")

    try:
        value = walk(tree.body)
    except (ValueError, ZeroDivisionError):
        return None
    return value if not Counter(used) - Counter(numbers) else None


class Countdown:
    name = "countdown"

    def generate(self, num_problems: int, seed: int, difficulty: int) -> list[Problem]:
        return _generate(self.name, num_problems, seed, difficulty)

    def extract(self, text: str) -> str | None:
        marked = marked_answer(text)
        if marked is None:
            return None
        expr = marked.split("=")[0].strip().rstrip(".")
        return re.sub(r"\s+", "", expr) or None

    def check(self, problem: Problem, answer: str | None) -> bool:
        if answer is None:
            return False
        numbers = problem.data["numbers"]
        assert isinstance(numbers, tuple)
        return eval_expression(answer, numbers) == problem.data["target"]

    def process_score(self, problem: Problem, partial: str) -> float | None:
        return None


def replay(problem: Problem, text: str) -> tuple[tuple[int, ...], bool, bool]:
    """Apply the steps in `text`: (remaining numbers, all steps valid, target produced)."""
    numbers = problem.data["numbers"]
    assert isinstance(numbers, tuple)
    pool = Counter(numbers)
    reached = False
    for a_s, op, b_s, c_s in _STEP.findall(text):
        a, b, c = int(a_s), int(b_s), int(c_s)
        op = "*" if op in "x×" else op
        need = Counter([a, b])
        legal = (op, c) in combine(max(a, b), min(a, b)) and (op not in "-/" or a >= b)
        if not legal or any(pool[v] < k for v, k in need.items()):
            return tuple(sorted(pool.elements())), False, reached
        pool -= need
        pool[c] += 1
        reached = reached or c == problem.data["target"]
    return tuple(sorted(pool.elements())), True, reached


class CountdownSteps:
    name = "countdown_steps"

    def generate(self, num_problems: int, seed: int, difficulty: int) -> list[Problem]:
        return _generate(self.name, num_problems, seed, difficulty)

    def extract(self, text: str) -> str | None:
        steps = [f"{a}{op}{b}={c}" for a, op, b, c in _STEP.findall(text)]
        return ";".join(steps) if steps else None

    def check(self, problem: Problem, answer: str | None) -> bool:
        if answer is None:
            return False
        _, valid, reached = replay(problem, answer.replace(";", "\n"))
        return valid and reached

    def process_score(self, problem: Problem, partial: str) -> float | None:
        pool, valid, reached = replay(problem, partial)
        if not valid:
            return 0.0
        target = problem.data["target"]
        assert isinstance(target, int)
        return 1.0 if reached or solvable(pool, target) else 0.0
