"""Bookkeeping every strategy composes: request ids, delta routing, scores, accounting, cancel."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from mixserve.scaling.accounting import Ledger, ModelCost
from mixserve.scaling.answers import Extractor
from mixserve.scaling.base import Candidate
from mixserve.scaling.samples import Sample, fold, tail_confidence
from mixserve.scaling.verifiers import ScoreQuery, Verifier

if TYPE_CHECKING:
    from mixserve.engine.engine import Engine
    from mixserve.outputs import RequestOutput


def derive_seed(seed: int | None, key: str) -> int | None:
    """A per-request seed fixed by (seed, key): forks of one context must not share a random stream."""
    if seed is None:
        return None
    digest = hashlib.blake2b(f"{seed}:{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & 0x7FFF_FFFF_FFFF_FFFF


@dataclass
class Tracker:
    """Owns the ids a strategy creates (`{strategy_id}/...`), folds its deltas, collects scores."""

    strategy_id: str
    prompt_ids: Sequence[int]
    extract: Extractor
    verifier: Verifier | None = None
    cost: ModelCost | None = None
    ledger: Ledger = field(init=False)
    samples: dict[tuple[str, int], Sample] = field(default_factory=dict)
    scores: dict[str, float] = field(default_factory=dict)
    pending: set[str] = field(default_factory=set)
    request_ids: list[str] = field(default_factory=list)
    _count: int = 0

    def __post_init__(self) -> None:
        self.ledger = Ledger(self.cost)

    def new_id(self, tag: str) -> str:
        self._count += 1
        return f"{self.strategy_id}/{tag}{self._count}"

    def started(self, request_id: str) -> str:
        self.request_ids.append(request_id)
        return request_id

    def owns(self, request_id: str) -> bool:
        return request_id.startswith(self.strategy_id + "/")

    def route(self, engine: Engine, out: RequestOutput) -> list[Sample]:
        """Account a delta; verifier deltas resolve scores, policy deltas return finished samples."""
        if self.verifier is not None and self.verifier.owns(out.request_id):
            self.ledger.record(out, "verifier")
            for key, score in self.verifier.on_output(engine, out):
                self.pending.discard(key)
                self.scores[key] = score
            return []
        self.ledger.record(out, "policy")
        return fold(self.samples, out)

    def abort(self, engine: Engine, request_id: str) -> None:
        """Abort (or release, if paused) a request, accounting its final delta."""
        final = engine.abort_request(request_id)
        self.ledger.record(final, "policy")
        if final is not None:
            fold(self.samples, final)

    def score(self, engine: Engine, key: str, response: str, final: bool,
              context_ids: Sequence[int], source: tuple[str, int] | None = None) -> None:
        assert self.verifier is not None
        self.ledger.verifier_calls += 1
        value = self.verifier.submit(engine, ScoreQuery(key, response, final, tuple(context_ids), source))
        if value is None:
            self.pending.add(key)
        else:
            self.scores[key] = value

    def candidate(self, index: int, sample: Sample, text: str | None = None,
                  score_key: str | None = None) -> Candidate:
        text = sample.text if text is None else text
        return Candidate(index=index, text=text, answer=self.extract(text), num_tokens=len(sample.token_ids),
                         score=self.scores.get(score_key) if score_key else None,
                         confidence=tail_confidence(sample.logprobs),
                         finish_reason=sample.finish_reason.value if sample.finish_reason else None)

    def cancel(self, engine: Engine) -> None:
        for request_id in self.request_ids:
            self.abort(engine, request_id)
        if self.verifier is not None:
            for key in list(self.pending):
                self.verifier.cancel(engine, key)
        self.pending.clear()
