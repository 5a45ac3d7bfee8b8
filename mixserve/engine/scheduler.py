"""Phase-less scheduler: each step hands out a token budget, running requests first (FCFS).

A request is its token list plus `num_computed_tokens`; prefill, chunked prefill and decode are the
same thing (compute the tokens that have no KV yet). When blocks run out, the most recently admitted
running request is preempted: its blocks are freed (they stay in the prefix cache) and it is
recomputed later from its full token list, so no generated token is lost.

The scheduler owns every state transition of a `Request` (the engine calls the methods under
"request state"): `add`, `append_token`, `stop`, `pause`, `fork`, `branch`, `finish`. What it hands
the runner is plain, picklable data (`SchedulerOutput`): ids, positions, token ids, block ids and a
frozen `SamplingSpec` per row, never a `Request`.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from mixserve.config import CacheConfig, SchedulerConfig
from mixserve.engine.block_pool import BlockPool
from mixserve.engine.kv_cache_manager import BlockCopy, KVCacheManager
from mixserve.engine.request import Request, RequestStatus
from mixserve.outputs import FinishReason
from mixserve.sampling_params import SamplingParams


def derive_seed(seed: int | None, sample_index: int) -> int | None:
    """The seed of sample `sample_index` of a request seeded with `seed` (sample 0 keeps it)."""
    if seed is None or sample_index == 0:
        return seed
    return hash((seed, sample_index)) & 0x7FFF_FFFF_FFFF_FFFF


@dataclass(frozen=True)
class SamplingSpec:
    """How one row samples this step: its params, its own seed (None: the runner's shared
    generator) and the ids it must not sample (EOS/stop ids while `len(output) < min_tokens`)."""

    params: SamplingParams
    seed: int | None
    suppress_token_ids: tuple[int, ...] = ()


@dataclass(frozen=True)
class ScheduledSeq:
    """One request's share of a step: compute `token_ids` at positions `start_pos...`. Plain data."""

    request_id: str
    start_pos: int
    """`num_computed_tokens` before this step."""
    token_ids: list[int]
    block_ids: list[int]
    """The request's whole block table after allocation."""
    sample: bool
    """The chunk reaches the end of the known tokens: sample the next one."""
    prompt_token_ids: tuple[int, ...]
    output_token_ids: tuple[int, ...]
    """Generated so far (before this step's token)."""
    spec: SamplingSpec

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def context(self) -> tuple[int, ...]:
        """Every known token of the request: prompt then output."""
        return self.prompt_token_ids + self.output_token_ids


@dataclass(frozen=True)
class SchedulerOutput:
    """What the runner executes in one step."""

    seqs: list[ScheduledSeq]
    copies: list[BlockCopy]
    """Copy-on-write block copies to apply before the forward pass."""
    finished_request_ids: list[str] = field(default_factory=list)
    """Requests that ended since the last step (the runner drops their per-request state)."""
    block_size: int = 16

    @property
    def num_tokens(self) -> int:
        return sum(s.num_tokens for s in self.seqs)

    @property
    def is_empty(self) -> bool:
        return not self.seqs


class Scheduler:
    """Owns the waiting queue, the running list, the KV cache manager and every request's state."""

    def __init__(self, config: SchedulerConfig, cache: CacheConfig, num_blocks: int,
                 eos_token_ids: tuple[int, ...] = ()) -> None:
        self.config = config
        self.block_size = cache.block_size
        self.eos_token_ids = eos_token_ids
        self.kv = KVCacheManager(num_blocks, cache.block_size, cache.enable_prefix_caching)
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self._finished_ids: list[str] = []
        self._last: dict[str, Request] = {}
        """Requests of the last `schedule()`, by id, for `update`."""
        self.num_preemptions = 0

    # -- request state ------------------------------------------------------------------------
    def add(self, request: Request) -> None:
        """Queue a new request (WAITING)."""
        max_blocks = -(-request.max_model_len // self.block_size)
        if max_blocks > self.kv.pool.num_blocks:
            # A request that can never fit would wait forever; the engine checks earlier, this guards.
            raise ValueError(f"request {request.request_id} needs up to {max_blocks} KV blocks, "
                             f"the pool has {self.kv.pool.num_blocks}")
        self.waiting.append(request)

    def append_token(self, request: Request, token: int) -> None:
        """Record a sampled token of a running request."""
        request.token_ids.append(token)

    def stop(self, request: Request, reason: FinishReason, stop_reason: str | int | None = None,
             error: str | None = None) -> None:
        """Mark why a sample stopped (it keeps its blocks until `finish` or `pause`)."""
        request.finish_reason = reason
        request.stop_reason = stop_reason
        if error is not None:
            request.error = error

    def fork(self, parent: Request, child: Request) -> None:
        """Admit `child`, a clone of `parent` (see `Request.clone`): it shares every KV block of a
        running parent and runs right after it, or waits with it."""
        if parent.status is RequestStatus.RUNNING:
            self.kv.fork(parent, child)
            self.running.insert(self.running.index(parent) + 1, child)
        else:
            self.waiting.append(child)

    def branch(self, parent: Request, child: Request) -> None:
        """Admit `child` made by `parent.branch(...)`: share the parent's KV when it has some."""
        if child.status is RequestStatus.RUNNING:
            self.kv.fork(parent, child)
            self.running.append(child)
        else:
            self.add(child)

    def clear_fork_point(self, request: Request) -> None:
        """The request was forked into its samples: prefill may go on to the end."""
        request.fork_at = None

    def ready_to_fork(self) -> list[Request]:
        """Running requests whose prefill reached their fork point."""
        return [r for r in self.running
                if r.fork_at is not None and r.num_computed_tokens >= r.fork_at]

    def pause(self, request: Request) -> None:
        """Stop scheduling a request but keep its tokens and KV blocks (status PAUSED)."""
        if request in self.running:
            self.running.remove(request)
        request.status = RequestStatus.PAUSED

    def finish(self, request: Request) -> None:
        """Remove a request (finished, aborted or released) and return its blocks."""
        request.status = RequestStatus.FINISHED
        if request in self.running:
            self.running.remove(request)
        elif request in self.waiting:
            self.waiting.remove(request)
        self.kv.free(request)
        self._finished_ids.append(request.request_id)

    @property
    def num_unfinished(self) -> int:
        return len(self.waiting) + len(self.running)

    @property
    def pool(self) -> BlockPool:
        """The KV block pool (read-only use: usage and prefix-cache counters)."""
        return self.kv.pool

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_running(self) -> int:
        return len(self.running)

    # -- the step -----------------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        self._last = {}
        budget = self.config.max_num_batched_tokens
        seqs: list[ScheduledSeq] = []
        copies: list[BlockCopy] = []
        num_preempted = self.num_preemptions
        i = 0
        while i < len(self.running) and budget > 0:
            request = self.running[i]
            num_new = min(request.num_tokens_to_compute(), budget)
            if num_new <= 0:
                i += 1
                continue
            result = self.kv.allocate(request, num_new)
            while result is None:
                victim = self.running[-1]
                if victim is request:
                    # Nothing else to evict: preempt this one and stop scheduling the running set.
                    self._preempt(request)
                    break
                self._preempt(victim)
                result = self.kv.allocate(request, num_new)
            if result is None:
                break
            copies.extend(result)
            seqs.append(self._scheduled(request, num_new))
            budget -= num_new
            i += 1
        if self.num_preemptions == num_preempted:  # memory is short this step: admit nobody
            budget = self._admit_waiting(budget, seqs)
        finished, self._finished_ids = self._finished_ids, []
        return SchedulerOutput(seqs=seqs, copies=copies, finished_request_ids=finished,
                               block_size=self.block_size)

    def _admit_waiting(self, budget: int, seqs: list[ScheduledSeq]) -> int:
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            request = self.waiting[0]
            cached = self.kv.find_cached_prefix(request) if request.num_computed_tokens == 0 else []
            computed = len(cached) * self.block_size if cached else request.num_computed_tokens
            end = request.num_tokens if request.fork_at is None else request.fork_at
            remaining = end - computed
            if remaining > budget and not self.config.enable_chunked_prefill:
                break
            num_new = min(remaining, budget)
            if self.kv.allocate(request, num_new, cached or None) is None:
                break
            self.waiting.popleft()
            request.status = RequestStatus.RUNNING
            self.running.append(request)
            if num_new > 0:
                seqs.append(self._scheduled(request, num_new))
                budget -= num_new
        return budget

    def _scheduled(self, request: Request, num_new: int) -> ScheduledSeq:
        start = request.num_computed_tokens
        end = start + num_new
        self._last[request.request_id] = request
        return ScheduledSeq(request_id=request.request_id, start_pos=start,
                            token_ids=request.token_ids[start:end],
                            block_ids=list(self.kv.block_table(request.request_id)),
                            sample=end == request.num_tokens and request.fork_at is None,
                            prompt_token_ids=request.prompt_tuple,
                            output_token_ids=tuple(request.output_token_ids),
                            spec=self._spec(request))

    def _spec(self, request: Request) -> SamplingSpec:
        params = request.params
        suppress: tuple[int, ...] = ()
        if request.num_output_tokens < params.min_tokens:
            suppress = tuple(params.stop_token_ids) + (() if params.ignore_eos else self.eos_token_ids)
        return SamplingSpec(params=params, seed=derive_seed(params.seed, request.sample_index),
                            suppress_token_ids=suppress)

    def _preempt(self, request: Request) -> None:
        self.running.remove(request)
        self.kv.free(request)
        request.num_computed_tokens = 0
        request.status = RequestStatus.WAITING
        request.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(request)

    def request_of(self, seq: ScheduledSeq) -> Request:
        """The request behind a row of the last `schedule()` (for the engine, not the runner)."""
        return self._last[seq.request_id]

    def update(self, out: SchedulerOutput) -> None:
        """Advance `num_computed_tokens` for what was computed and index newly full blocks."""
        for seq in out.seqs:
            request = self._last[seq.request_id]
            if request.finished or request.status is not RequestStatus.RUNNING:
                continue
            request.num_computed_tokens = seq.start_pos + seq.num_tokens
            self.kv.cache_full_blocks(request)
