"""Seeded sampling on a split model: the same token is drawn whichever side decides a position.

A sample's token at sequence position `p` uses the uniform of `position_generator(seed, p)` (the
project's counter-based seeding, `mixserve.sample.seeding`), and both sides run the project's
`Sampler` on their own logits with the same row: the edge on its exit head's logits, the cloud on the
full model's. So with every position deferred the split draws exactly the unsplit engine's tokens
(same seed, same logits), and with none deferred it draws the edge-only exit model's.

The exit rule reads the PROCESSED distribution: `softmax((logits + logit_bias, penalised, suppressed)
/ temperature)` (temperature 1 for greedy requests), before the top-k / top-p / min-p truncation, whose
renormalisation would only inflate the top probability (top_k=1 would always exit).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from mixserve.outputs import TokenLogprobs
from mixserve.sample.logprobs import gather_logprobs
from mixserve.sample.processors import apply_penalties, needs_penalties
from mixserve.sample.sampler import GREEDY_TEMPERATURE, Sampler, SamplingRow
from mixserve.sample.seeding import position_generator
from mixserve.sampling_params import SamplingParams

_FIELDS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty", "presence_penalty",
           "frequency_penalty", "logprobs")


@dataclass(frozen=True)
class SplitSampling:
    """What both sides need to sample one sequence: the params that shape the distribution, the
    sample's seed and the prompt length (penalties split a context into prompt and output)."""

    params: SamplingParams
    seed: int
    num_prompt: int = 0

    @property
    def greedy(self) -> bool:
        return self.params.greedy or self.params.temperature < GREEDY_TEMPERATURE

    @property
    def needs_ids(self) -> bool:
        """The cloud needs the positions' token ids (repetition/presence/frequency penalties)."""
        p = self.params
        return p.repetition_penalty != 1.0 or p.presence_penalty != 0.0 or p.frequency_penalty != 0.0

    @property
    def is_default(self) -> bool:
        """Plain greedy with no logit changes and no logprob alternatives: what a frame without a
        sampling block means (the seed does not matter to a greedy row)."""
        p = self.params
        return self.greedy and not self.needs_ids and not p.logit_bias and not p.logprobs

    def to_json(self) -> bytes:
        p = self.params
        data: dict[str, Any] = {name: getattr(p, name) for name in _FIELDS}
        data.update(logit_bias=[list(pair) for pair in p.logit_bias], seed=self.seed, num_prompt=self.num_prompt)
        return json.dumps(data, separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> SplitSampling:
        """Raises ValueError (naming the field) on anything malformed."""
        try:
            data = json.loads(raw)
            if not isinstance(data, dict):
                raise ValueError("the sampling block is not a JSON object")
            seed, num_prompt = data.pop("seed"), data.pop("num_prompt")
            data.pop("suppress", None)  # INFER_FULL's suppressed ids, read by the cloud service
            bias = tuple((int(t), float(b)) for t, b in data.pop("logit_bias", []))
            unknown = set(data) - set(_FIELDS)
            if unknown:
                raise ValueError(f"unknown sampling field(s) {sorted(unknown)}")
            if not isinstance(seed, int) or not isinstance(num_prompt, int) or num_prompt < 0:
                raise ValueError(f"invalid seed={seed!r} or num_prompt={num_prompt!r}")
            return cls(SamplingParams(max_tokens=None, logit_bias=bias, **data), seed, num_prompt)
        except (KeyError, TypeError, json.JSONDecodeError) as e:
            raise ValueError(f"malformed sampling block: {e}") from None


GREEDY = SplitSampling(SamplingParams(temperature=0.0, max_tokens=None), 0, 0)


def for_sample(params: SamplingParams, num_prompt: int, seed: int | None) -> SplitSampling:
    """The split sampling of one sample seeded with `seed` (the request's seed as the engine derives it
    per sample; None: a fresh random seed, still shared by both sides). The request's stop/length/n
    fields stay on the edge."""
    shaped = SamplingParams(**{name: getattr(params, name) for name in _FIELDS}, logit_bias=params.logit_bias,
                            max_tokens=None)
    if seed is None:
        seed = int.from_bytes(os.urandom(8), "little") >> 1
    return SplitSampling(shaped, seed, num_prompt)


class TokenPicker:
    """Samples one position from logits `[1, vocab_size]` with the project's sampler and position seeding."""

    def __init__(self) -> None:
        self.sampler = Sampler()

    def row(self, s: SplitSampling, ids: Sequence[int], position: int, suppress: tuple[int, ...]) -> SamplingRow:
        """`ids`: the sequence's tokens before `position` (prompt + output so far)."""
        return SamplingRow(s.params, ids[:s.num_prompt], ids[s.num_prompt:position],
                           position_generator(s.seed, position), suppress)

    @torch.no_grad()
    def pick(self, logits: torch.Tensor, s: SplitSampling, ids: Sequence[int], position: int,
             suppress: tuple[int, ...] = ()) -> tuple[int, TokenLogprobs]:
        """The token at `position` and its raw logprob entry (chosen + `params.logprobs` best)."""
        logits = logits.float().reshape(1, -1)
        token = self.sampler(logits, [self.row(s, ids, position, suppress)]).token_ids[0]
        return token, gather_logprobs(logits, [token], [s.params.logprobs or 0])[0]

    @torch.no_grad()
    def exit_probability(self, logits: torch.Tensor, s: SplitSampling, ids: Sequence[int], position: int,
                         suppress: tuple[int, ...] = ()) -> float:
        """Top probability of the processed distribution (see the module docstring)."""
        inv_t = 1.0 if s.greedy else 1.0 / s.params.temperature
        z = (logits.float().reshape(1, -1) * inv_t).contiguous()
        row = self.row(s, ids, position, suppress)
        if needs_penalties(row):
            apply_penalties(z, [row], [inv_t])
        return float(torch.softmax(z, dim=-1).max())
