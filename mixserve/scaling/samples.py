"""Fold engine deltas into per-sample records (text, tokens, logprobs, finish) for strategies."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from mixserve.outputs import FinishReason, TokenLogprobs

if TYPE_CHECKING:
    from mixserve.outputs import RequestOutput


@dataclass
class Sample:
    """Everything seen so far of one sample `(request_id, index)`."""

    request_id: str
    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprobs] = field(default_factory=list)
    finish_reason: FinishReason | None = None
    stop_reason: str | int | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def ended_by_stop_string(self) -> bool:
        return isinstance(self.stop_reason, str)


def fold(samples: dict[tuple[str, int], Sample], out: RequestOutput) -> list[Sample]:
    """Add a delta; returns the samples that finished in it."""
    finished = []
    for part in out.outputs:
        key = (out.request_id, part.index)
        sample = samples.setdefault(key, Sample(out.request_id, part.index))
        if sample.finished:
            continue
        sample.text += part.text
        sample.token_ids.extend(part.token_ids)
        if part.logprobs:
            sample.logprobs.extend(part.logprobs)
        if part.finish_reason is not None:
            sample.finish_reason = part.finish_reason
            sample.stop_reason = part.stop_reason
            finished.append(sample)
    return finished


def tail_confidence(logprobs: list[TokenLogprobs], tail: int = 64) -> float | None:
    """Negative mean entropy of the (renormalised top-k) next-token distributions over the last
    `tail` tokens: higher means the model was surer (its_hub / DeepConf style, no reward model)."""
    if not logprobs:
        return None
    entropies = []
    for position in logprobs[-tail:]:
        probs = [math.exp(lp.logprob) for lp in position.values()]
        total = sum(probs)
        entropies.append(-sum(p / total * math.log(p / total) for p in probs if p > 0))
    return -sum(entropies) / len(entropies)
