"""Per-request output state: detokenized text, stop checks, and deltas for streaming."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from mixserve.engine.request import Request
from mixserve.engine.stop import find_stop
from mixserve.loading.detokenizer import IncrementalDetokenizer
from mixserve.outputs import (
    CompletionOutput,
    FinishReason,
    RequestMetrics,
    RequestOutput,
    TokenLogprobs,
)
from mixserve.sampling_params import SamplingParams


@dataclass
class SampleState:
    """Text and tokens of one sample, with how much of each was already handed out."""

    request: Request
    detok: IncrementalDetokenizer
    text: str = ""
    num_text_sent: int = 0
    new_token_ids: list[int] = field(default_factory=list)
    new_logprobs: list[TokenLogprobs] = field(default_factory=list)
    finish_sent: bool = False
    text_final: bool = False
    finish_reason: FinishReason | None = None
    stop_reason: str | int | None = None
    error: str | None = None


@dataclass(frozen=True)
class Stop:
    """Why a sample must stop; the engine hands it to `Scheduler.stop`."""

    reason: FinishReason
    stop_reason: str | int | None = None
    error: str | None = None


class GroupState:
    """All samples of one caller request. `delta()` returns what changed since the last call.
    It reads `Request`s but never writes them: a stop it detects is returned as a `Stop`.

    Text is held back by `len(longest stop string) - 1` characters while a sample runs, so a stop
    string is never streamed in part; a matched stop string is cut from the text.

    `metrics` (a `RequestMetrics`) also carries two cumulative counts over all samples (compute
    accounting): `num_computed_tokens` and `num_computed_prompt_tokens`.
    """

    def __init__(self, request_id: str, prompt: str | None, prompt_ids: list[int],
                 params: SamplingParams, tokenizer: Any, eos_token_ids: tuple[int, ...]) -> None:
        self.request_id = request_id
        self.prompt = prompt
        self.prompt_ids = prompt_ids
        self.params = params
        self.tokenizer = tokenizer
        self.eos = frozenset(eos_token_ids)
        self.samples: list[Request] = []
        self.states: dict[int, SampleState] = {}
        self.prompt_logprobs: list[TokenLogprobs | None] | None = (
            [None] if params.prompt_logprobs is not None else None)
        self.prompt_logprobs_sent = False
        self.holdback = max((len(s) for s in params.stop), default=1) - 1
        self.metrics = RequestMetrics()
        self.num_cached_tokens = 0

    @property
    def finished(self) -> bool:
        return len(self.samples) == self.params.n and all(s.finish_reason for s in self.states.values())

    def add_sample(self, request: Request) -> None:
        self.samples.append(request)
        detok = IncrementalDetokenizer(self.tokenizer, self.prompt_ids, self.params.skip_special_tokens)
        self.states[request.sample_index] = SampleState(request, detok)

    def restore(self, sample_index: int, output_token_ids: list[int], num_text_sent: int) -> None:
        """A resumed sample (`ResumePoint`): replay its earlier outputs through the detokenizer, as the
        uninterrupted run did (they stopped nothing then), and mark `num_text_sent` characters as sent."""
        state = self.states[sample_index]
        for token in output_token_ids:
            state.text += state.detok.push(token)
        state.num_text_sent = min(num_text_sent, len(state.text))

    def on_computed(self, start_pos: int, num_tokens: int, num_prompt_tokens: int) -> None:
        """Count a chunk the runner computed at positions `start_pos...`."""
        prompt_part = max(0, min(start_pos + num_tokens, num_prompt_tokens) - start_pos)
        m = self.metrics
        self.metrics = replace(m, num_computed_tokens=m.num_computed_tokens + num_tokens,
                               num_computed_prompt_tokens=m.num_computed_prompt_tokens + prompt_part)

    def add_prompt_logprobs(self, entries: list[TokenLogprobs]) -> None:
        assert self.prompt_logprobs is not None
        self.prompt_logprobs.extend(entries)

    # -- tokens in ----------------------------------------------------------------------------
    def on_token(self, request: Request, token: int, logprobs: TokenLogprobs | None,
                 now: float) -> Stop | None:
        """Record a sampled token (already appended to `request`); returns a `Stop` when the
        sample must stop."""
        if self.metrics.first_token_time is None:
            self.metrics = replace(self.metrics, first_token_time=now)
        self.num_cached_tokens = max(self.num_cached_tokens, request.num_cached_tokens)
        state = self.states[request.sample_index]
        state.new_token_ids.append(token)
        if logprobs is not None:
            state.new_logprobs.append(logprobs)
        params = request.params
        num_out = request.num_output_tokens
        allowed_to_stop = num_out >= params.min_tokens
        if allowed_to_stop and not params.ignore_eos and token in self.eos:
            return self._stop(state, FinishReason.STOP, None)
        if allowed_to_stop and token in params.stop_token_ids:
            return self._stop(state, FinishReason.STOP, token)
        delta = state.detok.push(token)
        state.text += delta
        if params.stop and delta and allowed_to_stop:
            hit = find_stop(state.text, len(delta), params.stop)
            if hit is not None:
                index, stop = hit
                state.text = state.text[:index + (len(stop) if params.include_stop_str_in_output else 0)]
                state.text_final = True
                return self._stop(state, FinishReason.STOP, stop)
        if params.max_tokens is not None and num_out >= params.max_tokens:
            return self._stop(state, FinishReason.LENGTH, None)
        if request.num_tokens >= request.max_model_len:
            return self._stop(state, FinishReason.LENGTH, None)
        return None

    def _stop(self, state: SampleState, reason: FinishReason, stop_reason: str | int | None,
              error: str | None = None) -> Stop:
        if not state.text_final:
            state.text += state.detok.flush()
            state.text_final = True
        state.finish_reason, state.stop_reason, state.error = reason, stop_reason, error
        return Stop(reason, stop_reason, error)

    def fail(self, request: Request, message: str) -> Stop:
        return self._stop(self.states[request.sample_index], FinishReason.ERROR, None, message)

    def abort(self, request: Request) -> Stop:
        return self._stop(self.states[request.sample_index], FinishReason.ABORT, None)

    def end(self, request: Request, reason: FinishReason) -> None:
        """Record a stop decided outside this group (e.g. an engine error) unless one is recorded."""
        state = self.states[request.sample_index]
        if state.finish_reason is None:
            self._stop(state, reason, None)

    # -- deltas out ---------------------------------------------------------------------------
    def delta(self) -> RequestOutput:
        outputs = []
        for index in sorted(self.states):
            state = self.states[index]
            done = state.finish_reason is not None
            limit = len(state.text) if done else max(state.num_text_sent, len(state.text) - self.holdback)
            text = state.text[state.num_text_sent:limit]
            if not state.new_token_ids and not text and (state.finish_sent or not done):
                continue
            outputs.append(CompletionOutput(
                index=index, text=text, token_ids=state.new_token_ids,
                logprobs=state.new_logprobs if self.params.logprobs is not None else None,
                finish_reason=state.finish_reason, stop_reason=state.stop_reason,
                error=state.error))
            state.num_text_sent = limit
            state.new_token_ids, state.new_logprobs = [], []
            state.finish_sent = done
        prompt_logprobs = None
        if self.prompt_logprobs is not None and not self.prompt_logprobs_sent and \
                len(self.prompt_logprobs) >= len(self.prompt_ids):
            prompt_logprobs = self.prompt_logprobs[:len(self.prompt_ids)]
            self.prompt_logprobs_sent = True
        return RequestOutput(request_id=self.request_id, prompt=self.prompt,
                             prompt_token_ids=self.prompt_ids, outputs=outputs, finished=self.finished,
                             prompt_logprobs=prompt_logprobs, num_cached_tokens=self.num_cached_tokens,
                             metrics=self.metrics)
