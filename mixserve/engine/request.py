"""One sequence being generated: its tokens and how many of them have KV in the cache."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from enum import Enum

from mixserve.outputs import FinishReason
from mixserve.sampling_params import SamplingParams


class RequestStatus(Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PAUSED = "paused"
    """Stopped normally but kept (tokens and KV blocks) so that it can be forked; see `Engine.fork_request`."""
    FINISHED = "finished"


@dataclass(eq=False)
class Request:
    """A single sample. Invariant: `num_computed_tokens <= num_tokens`; the tokens in
    `token_ids[num_computed_tokens:]` have no KV yet and are what the next steps compute.

    A request with `n > 1` starts as one request (`fork_at = prompt_len - 1`): it prefills all but
    the last prompt token, then is forked into `n` samples sharing those KV blocks.
    """

    request_id: str
    """Unique id of this sample (`group_id` for single samples, `group_id#i` for forks)."""
    group_id: str
    """The caller's request id shared by all samples of one prompt."""
    sample_index: int
    prompt_token_ids: list[int]
    params: SamplingParams
    max_model_len: int
    token_ids: list[int] = field(default_factory=list)
    """Prompt followed by generated tokens."""
    num_computed_tokens: int = 0
    num_cached_tokens: int = 0
    """Prompt tokens that came from the prefix cache on first admission."""
    status: RequestStatus = RequestStatus.WAITING
    finish_reason: FinishReason | None = None
    stop_reason: str | int | None = None
    error: str | None = None
    fork_at: int | None = None
    """When set, prefill stops at this many tokens and the engine forks the request."""
    arrival_time: float = field(default_factory=time.monotonic)
    num_preemptions: int = 0
    pause_on_finish: bool = False
    """On a normal stop (STOP or LENGTH) keep tokens and KV blocks (status PAUSED) instead of freeing."""

    def __post_init__(self) -> None:
        if not self.token_ids:
            self.token_ids = list(self.prompt_token_ids)
        self.prompt_tuple = tuple(self.prompt_token_ids)
        """The prompt as handed to the runner (made once: it never changes)."""

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[len(self.prompt_token_ids):]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - len(self.prompt_token_ids)

    @property
    def finished(self) -> bool:
        return self.status is RequestStatus.FINISHED

    def num_tokens_to_compute(self) -> int:
        """Tokens still without KV, capped at the fork point while a fork is pending."""
        end = self.num_tokens if self.fork_at is None else self.fork_at
        return end - self.num_computed_tokens

    def clone(self, request_id: str, sample_index: int) -> Request:
        """A sample that continues exactly where this one is (KV sharing is the manager's job)."""
        return Request(request_id=request_id, group_id=self.group_id, sample_index=sample_index,
                       prompt_token_ids=self.prompt_token_ids, params=self.params,
                       max_model_len=self.max_model_len, token_ids=list(self.token_ids),
                       num_computed_tokens=self.num_computed_tokens,
                       num_cached_tokens=self.num_cached_tokens, status=self.status,
                       arrival_time=self.arrival_time, pause_on_finish=self.pause_on_finish)

    def branch(self, request_id: str, params: SamplingParams, append_token_ids: list[int],
               pause_on_finish: bool) -> Request:
        """A new single-sample request whose prompt is this one's tokens plus `append_token_ids`.

        It starts with this request's `num_computed_tokens` (the KV the manager shares with it), so
        it computes only the tokens that have no KV yet: usually the last sampled token plus the
        appended ones. Those reused tokens are reported as cached prompt tokens.
        """
        has_kv = self.status in (RequestStatus.RUNNING, RequestStatus.PAUSED)
        context = self.token_ids + append_token_ids
        # At least one token must be computed to get logits to sample from.
        computed = min(self.num_computed_tokens, len(context) - 1) if has_kv else 0
        return Request(request_id=request_id, group_id=request_id, sample_index=0,
                       prompt_token_ids=list(context), params=params, max_model_len=self.max_model_len,
                       num_computed_tokens=computed, num_cached_tokens=computed,
                       status=RequestStatus.RUNNING if has_kv else RequestStatus.WAITING,
                       pause_on_finish=pause_on_finish)
