"""Verifiers behind one protocol: programmatic (task), user functions, oracle and noisy process
rewards. The LLM judge (`judge.py`) scores through engine requests, so scoring is asynchronous in
general: `submit` returns the score at once (programmatic verifiers) or None, and the score arrives
later from `on_output` as `(key, score)` once the verifier's own requests finish.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

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
