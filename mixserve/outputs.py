"""What the engine hands back: per-request outputs, one completion per sample (no torch here)."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum


class FinishReason(str, Enum):
    """Why a sample stopped; the string values are the OpenAI ones."""

    STOP = "stop"
    """EOS, a stop token id or a stop string."""
    LENGTH = "length"
    """max_tokens or the model's context length reached."""
    ABORT = "abort"
    """Aborted by the caller (disconnect, cancel, strategy early stop)."""
    ERROR = "error"
    """The request failed; `CompletionOutput.error` says why. Other requests are unaffected."""


@dataclass
class Logprob:
    """Log-probability of one token at one position, with its rank (1 = most likely)."""

    logprob: float
    rank: int
    decoded: str | None = None


TokenLogprobs = dict[int, Logprob]
"""token id -> Logprob for the chosen token and the top alternatives at one position."""


@dataclass
class CompletionOutput:
    """One sample of a request. In a streaming delta, `token_ids`/`text` hold only the new part."""

    index: int
    text: str
    token_ids: list[int]
    logprobs: list[TokenLogprobs] | None = None
    finish_reason: FinishReason | None = None
    stop_reason: str | int | None = None
    """The stop string or token id that ended the sample, if any."""
    error: str | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass(frozen=True)
class RequestMetrics:
    """Timing and compute counts of one request, cumulative over all its samples."""

    first_token_time: float | None = None
    """`time.monotonic()` when the first token of any sample was sampled."""
    num_computed_tokens: int = 0
    """Tokens the runner computed (recomputation after preemption included)."""
    num_computed_prompt_tokens: int = 0
    """Those at prompt positions: prefill work that was not reused."""


@dataclass
class RequestOutput:
    """Outputs of one request (all its samples). `finished` once every sample has finished."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool = False
    prompt_logprobs: list[TokenLogprobs | None] | None = None
    num_cached_tokens: int = 0
    """Prompt tokens served from the prefix cache instead of being computed."""
    metrics: RequestMetrics = field(default_factory=RequestMetrics)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_generated_tokens(self) -> int:
        return sum(len(o.token_ids) for o in self.outputs)
