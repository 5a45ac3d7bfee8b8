"""Phase-less scheduler: each step hands out a token budget, running requests first (FCFS).

A request is its token list plus `num_computed_tokens`; prefill, chunked prefill and decode are the
same thing (compute the tokens that have no KV yet). When blocks run out, the most recently admitted
running request is preempted: its blocks are freed (they stay in the prefix cache) and it is
recomputed later from its full token list, so no generated token is lost.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from mixserve.config import CacheConfig, SchedulerConfig
from mixserve.engine.kv_cache_manager import BlockCopy, KVCacheManager
from mixserve.engine.request import Request, RequestStatus


@dataclass(frozen=True)
class ScheduledSeq:
    """One request's share of a step: compute `token_ids` at positions `start_pos...`."""

    request: Request
    start_pos: int
    """`num_computed_tokens` before this step."""
    token_ids: list[int]
    block_ids: list[int]
    """The request's whole block table after allocation."""
    sample: bool
    """The chunk reaches the end of the known tokens: sample the next one."""

    @property
    def request_id(self) -> str:
        return self.request.request_id

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)


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
    """Owns the waiting queue, the running list, and the KV cache manager."""

    def __init__(self, config: SchedulerConfig, cache: CacheConfig, num_blocks: int) -> None:
        self.config = config
        self.block_size = cache.block_size
        self.kv = KVCacheManager(num_blocks, cache.block_size, cache.enable_prefix_caching)
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self._finished_ids: list[str] = []
        self.num_preemptions = 0

    # -- queue management ---------------------------------------------------------------------
    def add(self, request: Request) -> None:
        max_blocks = -(-request.max_model_len // self.block_size)
        if max_blocks > self.kv.pool.num_blocks:
            # A request that can never fit would wait forever; the engine checks earlier, this guards.
            raise ValueError(f"request {request.request_id} needs up to {max_blocks} KV blocks, "
                             f"the pool has {self.kv.pool.num_blocks}")
        self.waiting.append(request)

    def add_running(self, request: Request, after: Request) -> None:
        """Insert a freshly forked sample right after its parent."""
        self.running.insert(self.running.index(after) + 1, request)

    def finish(self, request: Request) -> None:
        """Remove a request (finished or aborted) and return its blocks."""
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

    # -- the step -----------------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
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
        return ScheduledSeq(request=request, start_pos=start, token_ids=request.token_ids[start:end],
                            block_ids=self.kv.block_table(request.request_id),
                            sample=end == request.num_tokens and request.fork_at is None)

    def _preempt(self, request: Request) -> None:
        self.running.remove(request)
        self.kv.free(request)
        request.num_computed_tokens = 0
        request.status = RequestStatus.WAITING
        request.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(request)

    def update(self, out: SchedulerOutput) -> None:
        """Advance `num_computed_tokens` for what was computed and index newly full blocks."""
        for seq in out.seqs:
            request = seq.request
            if request.finished or request.status is not RequestStatus.RUNNING:
                continue
            request.num_computed_tokens = seq.start_pos + seq.num_tokens
            self.kv.cache_full_blocks(request)
