"""Sampling parameters of one request, validated at construction (no torch here)."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

from mixserve.config import FieldError
from mixserve.structured.spec import StructuredOutput

SEED_MIN = -(2**63)
SEED_MAX = 2**64 - 1
"""Seeds accepted: integers in [-2**63, 2**64 - 1], the range `torch.Generator.manual_seed` takes."""


class SamplingError(FieldError):
    """A sampling parameter is out of range; the message names the field and the value."""


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens and when to stop. Invalid values raise `SamplingError` naming the field."""

    n: int = 1
    """Number of samples returned for the prompt; the prompt is prefilled once and forked."""
    temperature: float = 1.0
    """0 means greedy; otherwise logits are divided by it before softmax."""
    top_k: int | None = None
    """Keep only the k most likely tokens (None: all)."""
    top_p: float = 1.0
    """Keep the smallest set of tokens whose probability sums to at least top_p, in (0, 1]."""
    min_p: float = 0.0
    """Drop tokens whose probability is below min_p times the top token's, in [0, 1]."""
    repetition_penalty: float = 1.0
    """> 1 discourages tokens already in the prompt or output (CTRL-style divide/multiply)."""
    presence_penalty: float = 0.0
    """Subtracted once from the logit of every token already generated, in [-2, 2]."""
    frequency_penalty: float = 0.0
    """Subtracted per occurrence from the logit of tokens already generated, in [-2, 2]."""
    seed: int | None = None
    """Per-request seed: the same seed gives the same tokens whatever else is in the batch.
    Any integer in [SEED_MIN, SEED_MAX] = [-2**63, 2**64 - 1]."""
    max_tokens: int | None = 16
    """Maximum number of generated tokens per sample; None means up to the context length."""
    min_tokens: int = 0
    """Stop tokens and EOS are suppressed until this many tokens were generated."""
    stop: tuple[str, ...] = ()
    """Strings that end generation; they are not included in the output text."""
    stop_token_ids: tuple[int, ...] = ()
    """Token ids that end generation (in addition to the model's EOS unless ignore_eos)."""
    ignore_eos: bool = False
    """Keep generating past the model's end-of-sequence tokens."""
    logprobs: int | None = None
    """Return the sampled token's logprob and this many top alternatives per step (0: only sampled)."""
    prompt_logprobs: int | None = None
    """Return logprobs of each prompt token (and this many alternatives); disables prefix-cache hits."""
    skip_special_tokens: bool = True
    """Leave special tokens out of the detokenized text."""
    include_stop_str_in_output: bool = False
    """Keep the matched stop string at the end of the text."""
    logit_bias: tuple[tuple[int, float], ...] = ()
    """(token id, bias) pairs added to the logits before sampling, bias in [-100, 100] (a dict is accepted)."""
    structured: StructuredOutput | None = None
    """Constrain the output to a JSON schema, any JSON object, a regex, a choice or a grammar (see
    `mixserve.structured`). Not combinable with stop strings/ids, ignore_eos or min_tokens: a
    constrained sample ends only when its constraint is complete (EOS) or at max_tokens (`length`)."""
    extra: dict[str, object] = field(default_factory=dict, compare=False, hash=False)
    """Free-form fields passed through for strategies and the server; never read by the engine."""

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        else:
            object.__setattr__(self, "stop", tuple(self.stop))
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
        bias = self.logit_bias.items() if isinstance(self.logit_bias, dict) else self.logit_bias
        object.__setattr__(self, "logit_bias", tuple((t, b) for t, b in bias))
        self._validate()

    def _validate(self) -> None:
        def bad(name: str, value: object, why: str) -> SamplingError:
            return SamplingError(f"invalid sampling parameter {name}={value!r}: {why}", field=name)

        if not isinstance(self.n, int) or self.n < 1:
            raise bad("n", self.n, "must be an integer >= 1")
        if self.n > 1024:
            raise bad("n", self.n, "must be <= 1024")
        if not _is_number(self.temperature) or self.temperature < 0:
            raise bad("temperature", self.temperature, "must be a number >= 0")
        if self.top_k is not None and (not isinstance(self.top_k, int) or self.top_k < 1):
            raise bad("top_k", self.top_k, "must be None or an integer >= 1")
        if not _is_number(self.top_p) or not 0 < self.top_p <= 1:
            raise bad("top_p", self.top_p, "must be in (0, 1]")
        if not _is_number(self.min_p) or not 0 <= self.min_p <= 1:
            raise bad("min_p", self.min_p, "must be in [0, 1]")
        if not _is_number(self.repetition_penalty) or self.repetition_penalty <= 0:
            raise bad("repetition_penalty", self.repetition_penalty, "must be > 0")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not _is_number(value) or not -2 <= value <= 2:
                raise bad(name, value, "must be in [-2, 2]")
        if self.max_tokens is not None and (not isinstance(self.max_tokens, int) or self.max_tokens < 1):
            raise bad("max_tokens", self.max_tokens, "must be None or an integer >= 1")
        if not isinstance(self.min_tokens, int) or self.min_tokens < 0:
            raise bad("min_tokens", self.min_tokens, "must be an integer >= 0")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise bad("min_tokens", self.min_tokens, f"must be <= max_tokens ({self.max_tokens})")
        if self.seed is not None and (not isinstance(self.seed, int) or isinstance(self.seed, bool)
                                      or not SEED_MIN <= self.seed <= SEED_MAX):
            raise bad("seed", self.seed, "must be None or an integer in [-2**63, 2**64 - 1]")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or not 0 <= value <= 20):
                raise bad(name, value, "must be None or an integer in [0, 20]")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise bad("stop", self.stop, "must be non-empty strings")
        for token, value in self.logit_bias:
            if not isinstance(token, int) or token < 0 or not _is_number(value) or not -100 <= value <= 100:
                raise bad("logit_bias", dict(self.logit_bias), "must map token ids >= 0 to numbers in [-100, 100]")
        if any(not isinstance(t, int) or t < 0 for t in self.stop_token_ids):
            raise bad("stop_token_ids", self.stop_token_ids, "must be non-negative integers")
        self._validate_structured(bad)

    def _validate_structured(self, bad: Callable[[str, object, str], SamplingError]) -> None:
        if self.structured is None:
            return
        if not isinstance(self.structured, StructuredOutput):
            raise bad("structured", self.structured, "must be a StructuredOutput")
        for name, value in (("stop", self.stop), ("stop_token_ids", self.stop_token_ids),
                            ("ignore_eos", self.ignore_eos), ("min_tokens", self.min_tokens)):
            if value:
                raise bad(name, value, "cannot be combined with structured output (the constraint decides "
                                       "where the output ends)")

    @property
    def greedy(self) -> bool:
        """True when the sampler takes the argmax."""
        return self.temperature == 0.0 or self.top_k == 1


def _is_number(value: object) -> bool:
    """A real, finite number (not a bool, NaN or an infinity)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False
    return isinstance(value, int) or math.isfinite(value)
