"""A request in flight through the cluster: what its client has received, per sample, and its legs.

A *leg* is one remote request on one replica streaming some of the flight's samples. The first leg
streams all `n` samples; when its replica dies, or the request migrates, each unfinished sample continues
as a new single-sample leg elsewhere, resumed (`ResumePoint`) from exactly the tokens and text its client
already has. Deltas of every leg are rewritten to the client's view (request id, sample index, prompt),
so the client sees one uninterrupted request: no token twice, none missing.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from mixserve.engine.engine import ResumePoint
from mixserve.engine.scheduler import derive_seed
from mixserve.outputs import CompletionOutput, FinishReason, RequestOutput
from mixserve.sampling_params import SamplingParams


@dataclass
class SampleProgress:
    """What the client has of one sample."""

    token_ids: list[int] = field(default_factory=list)
    num_text_sent: int = 0
    finished: bool = False


@dataclass(eq=False)
class Leg:
    replica: Any
    """The `ReplicaHandle` streaming it."""
    remote_id: str
    index_map: dict[int, int]
    """Sample index on the replica -> the client's sample index."""
    stream: Any
    """Ray's ObjectRefGenerator of the replica's `generate`."""
    task: asyncio.Task[None] | None = None
    first: bool = False
    """The flight's first leg (its prompt logprobs and cached-token count are the client's)."""


@dataclass(eq=False)
class Flight:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    """With a seed always set (the ingress draws one for unseeded requests) so resumption is exact."""
    prompt: str | None
    queue: asyncio.Queue[RequestOutput | BaseException]
    session: str | None = None
    progress: dict[int, SampleProgress] = field(default_factory=dict)
    legs: set[Leg] = field(default_factory=set)
    aborted: bool = False
    prompt_logprobs_sent: bool = False
    num_cached_tokens: int = 0
    num_resumes: int = 0
    pause_started: float | None = None
    """Set when the flight's stream was interrupted (failover, migration) until its next token."""
    pause_kind: str = ""
    on_pause: Callable[[str, float], None] | None = None
    """Called with (pause_kind, seconds) when the first token after an interruption arrives."""

    def interrupted(self, kind: str) -> None:
        """The stream stops here (`kind`: failover or migration) until a resumed leg sends a token."""
        self.pause_started, self.pause_kind = time.monotonic(), kind
        self.num_resumes += 1

    def __post_init__(self) -> None:
        self.progress = {i: SampleProgress() for i in range(self.params.n)}

    @property
    def finished(self) -> bool:
        return all(p.finished for p in self.progress.values())

    def unfinished(self, leg: Leg) -> list[int]:
        return [ci for ci in leg.index_map.values() if not self.progress[ci].finished]

    def resume_args(self, sample: int) -> tuple[SamplingParams, ResumePoint]:
        """Params and resume point continuing client sample `sample` as a single-sample request."""
        p = self.progress[sample]
        params = self.params if self.params.n == 1 else \
            replace(self.params, n=1, seed=derive_seed(self.params.seed, sample))
        return params, ResumePoint(tuple(p.token_ids), p.num_text_sent)

    def deliver(self, leg: Leg, out: RequestOutput) -> RequestOutput | None:
        """A replica's delta as the client's delta (None when nothing new for the client)."""
        outputs = []
        for o in out.outputs:
            sample = leg.index_map[o.index]
            p = self.progress[sample]
            if p.finished:
                continue
            p.token_ids.extend(o.token_ids)
            p.num_text_sent += len(o.text)
            p.finished = o.finish_reason is not None
            outputs.append(replace(o, index=sample))
        if self.pause_started is not None and any(o.token_ids for o in outputs):
            if self.on_pause is not None:
                self.on_pause(self.pause_kind, time.monotonic() - self.pause_started)
            self.pause_started = None
        prompt_logprobs = None
        if out.prompt_logprobs is not None and not self.prompt_logprobs_sent:
            prompt_logprobs, self.prompt_logprobs_sent = out.prompt_logprobs, True
        if leg.first:
            self.num_cached_tokens = max(self.num_cached_tokens, out.num_cached_tokens)
        if not outputs and prompt_logprobs is None:
            return None
        return RequestOutput(self.request_id, self.prompt, self.prompt_token_ids, outputs, self.finished,
                             prompt_logprobs, self.num_cached_tokens, out.metrics)

    def end(self, samples: list[int], reason: FinishReason, error: str | None = None) -> RequestOutput | None:
        """Finish `samples` here (aborted, or no replica left): the client's final delta for them."""
        outputs = []
        for sample in samples:
            p = self.progress[sample]
            if not p.finished:
                p.finished = True
                outputs.append(CompletionOutput(index=sample, text="", token_ids=[], finish_reason=reason,
                                                error=error))
        if not outputs:
            return None
        return RequestOutput(self.request_id, self.prompt, self.prompt_token_ids, outputs, self.finished,
                             num_cached_tokens=self.num_cached_tokens)
