"""Verifiers behind one protocol: programmatic (task), user functions, oracle and noisy process
rewards. The LLM judge (`judge.py`) scores through engine requests, so scoring is asynchronous in
general: `submit` returns the score at once (programmatic verifiers) or None, and the score arrives
later from `on_output` as `(key, score)` once the verifier's own requests finish.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from mixserve.engine.engine import Engine
    from mixserve.outputs import RequestOutput


@dataclass(frozen=True)
class ScoreQuery:
    """One thing to score: a finished candidate (`final`) or a partial step-level path."""

    key: str
    """Unique within the strategy and prefixed by its id; engine-backed verifiers derive request ids."""
    response: str
    """The generated text so far (every step for step-level search)."""
    final: bool
    context_ids: tuple[int, ...]
    """Prompt + response token ids (used when there is no paused source to fork from)."""
    source: tuple[str, int] | None = None
    """A paused sample `(request_id, sample_index)` whose KV holds `context_ids`."""


class Verifier(Protocol):
    @property
    def name(self) -> str: ...

    @property
    def needs_context(self) -> bool:
        """True when scoring forks from the candidate's KV (strategies then pause samples)."""

    def submit(self, engine: Engine, query: ScoreQuery) -> float | None: ...

    def owns(self, request_id: str) -> bool: ...

    def on_output(self, engine: Engine, out: RequestOutput) -> list[tuple[str, float]]: ...

    def cancel(self, engine: Engine, key: str) -> None: ...


Score = Callable[[str], float]


class FunctionVerifier:
    """A synchronous verifier from Python functions of the response text (user-supplied or a task's).

    `outcome` scores finished answers; `process` (default: `outcome`) scores partial step paths.
    """

    needs_context = False

    def __init__(self, outcome: Score, process: Score | None = None, name: str = "function") -> None:
        self.outcome = outcome
        self.process = process or outcome
        self._name = name

    @property
    def name(self) -> str:
        return self._name

    def submit(self, engine: Engine, query: ScoreQuery) -> float | None:
        return float((self.outcome if query.final else self.process)(query.response))

    def owns(self, request_id: str) -> bool:
        return False

    def on_output(self, engine: Engine, out: RequestOutput) -> list[tuple[str, float]]:
        return []

    def cancel(self, engine: Engine, key: str) -> None:
        return None


def flip_noise(seed: int, key: str) -> float:
    """A uniform in [0, 1) fixed by (seed, key), the same in every process."""
    digest = hashlib.blake2b(f"{seed}:{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2**64


class NoisyVerifier:
    """Wraps a synchronous verifier and flips its score (s -> 1 - s) with probability `flip`,
    reproducibly per query key: reward hacking / PRM noise for testing search robustness."""

    needs_context = False

    def __init__(self, inner: FunctionVerifier, flip: float, seed: int = 0) -> None:
        if not 0.0 <= flip <= 1.0:
            raise ValueError(f"invalid noise={flip!r}: must be in [0, 1]")
        self.inner, self.flip, self.seed = inner, flip, seed

    @property
    def name(self) -> str:
        return f"noisy_{self.inner.name}"

    def submit(self, engine: Engine, query: ScoreQuery) -> float | None:
        score = self.inner.submit(engine, query)
        assert score is not None
        return 1.0 - score if flip_noise(self.seed, query.key) < self.flip else score

    def owns(self, request_id: str) -> bool:
        return False

    def on_output(self, engine: Engine, out: RequestOutput) -> list[tuple[str, float]]:
        return []

    def cancel(self, engine: Engine, key: str) -> None:
        return None


# -- verifiers that see the problem ---------------------------------------------------------------
@dataclass(frozen=True)
class ScaleProblem:
    """One problem for `LLM.scale`: its prompt and any user data a verifier needs (a reasoning-gym
    entry, unit tests, a reference answer)."""

    prompt: Any
    """A prompt string, token ids, or chat `messages` (the chat template is applied)."""
    data: Any = None
    """Handed to problem-aware verifiers untouched (`ProblemVerifier.score`)."""


@dataclass(frozen=True)
class Answered:
    """A finished candidate as a verifier sees it."""

    text: str
    answer: str | None
    """The extracted canonical answer (None: the extractor found none)."""


class ProblemVerifier(Protocol):
    """Scores a candidate of a problem in [0, 1]. What a score strictly between 0 and 1 means to each
    strategy is documented in `select.py` (a rank for best-of-N, a vote weight for weighted majority,
    a reward inside the frequency gate for Best-of-Majority, a process reward for step search)."""

    @property
    def name(self) -> str: ...

    def score(self, problem: ScaleProblem, candidate: Answered) -> float: ...


def check_score(value: object, who: str) -> float:
    """A verifier's return value as a float in [0, 1] (bools are 0/1); anything else is an error."""
    if isinstance(value, bool):
        return float(value)
    if not isinstance(value, (int, float)) or math.isnan(value) or not 0.0 <= value <= 1.0:
        from mixserve.scaling.base import ScalingError

        raise ScalingError(f"invalid verifier score {value!r} from {who}: must be a number in [0, 1]",
                           field="verifier")
    return float(value)


class ScoreAnswerVerifier:
    """Adapter for reasoning-gym-style scorers `score_answer(answer, entry) -> float`: `answer` is the
    extracted answer (None when there is none), `entry` the problem's `data`."""

    def __init__(self, score_answer: Callable[[str | None, Any], float], name: str = "score_answer") -> None:
        self.score_answer = score_answer
        self._name = name

    @property
    def name(self) -> str:
        return self._name

    def score(self, problem: ScaleProblem, candidate: Answered) -> float:
        return check_score(self.score_answer(candidate.answer, problem.data), self._name)


class AnswerFunctionVerifier:
    """Runs a function on the extracted answer: `fn(answer)` or, with `with_data`, `fn(answer, data)`
    (a unit-test runner, a checker); a bool is 0/1, an exception scores 0. A candidate without an
    answer scores 0 without calling it."""

    def __init__(self, fn: Callable[..., float | bool], with_data: bool = False, name: str = "answer_function"):
        self.fn = fn
        self.with_data = with_data
        self._name = name

    @property
    def name(self) -> str:
        return self._name

    def score(self, problem: ScaleProblem, candidate: Answered) -> float:
        if candidate.answer is None:
            return 0.0
        try:
            value = self.fn(candidate.answer, problem.data) if self.with_data else self.fn(candidate.answer)
        except Exception:  # noqa: BLE001 - a crashing check is a failed check
            return 0.0
        return check_score(value, self._name)


def is_problem_verifier(obj: object) -> bool:
    return callable(getattr(obj, "score", None)) and not callable(getattr(obj, "submit", None))


def bind_problem(verifier: ProblemVerifier, problem: ScaleProblem,
                 extract: Callable[[str], str | None]) -> FunctionVerifier:
    """A problem-aware verifier as the engine-facing `Verifier` of one problem's strategy."""

    def outcome(text: str) -> float:
        return check_score(verifier.score(problem, Answered(text, extract(text))), verifier.name)

    return FunctionVerifier(outcome, name=verifier.name)
