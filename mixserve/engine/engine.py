"""The step loop: add requests, schedule, execute through a runner, turn tokens into outputs.

Pure Python: the runner (torch) sits behind the `ModelRunner` protocol. Every public method leaves
the engine consistent; a failing request is finished with `FinishReason.ERROR` and its blocks are
freed, the other requests in the batch carry on.

Branching (for inference-time scaling): a request added with `pause_on_finish=True` is *paused*
instead of freed when a sample stops normally (stop string, stop token, EOS or max_tokens). Its
final delta still says `finished=True`, but its tokens and KV blocks stay until `release_request`.
`fork_request` starts a new request from a live (running) or paused sample: the child shares every
KV block of the parent (copy-on-write of the partial block) and computes only the tokens without KV
(the parent's last sampled token plus any appended tokens), so no prefix is ever recomputed. To
continue a paused sample, fork it and release it. Invariant: paused blocks are pinned (never
preempted); whoever pauses a request must fork or release it.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

from mixserve.config import EngineConfig
from mixserve.engine.kv_transfer import KVExport, export_kv, import_kv
from mixserve.engine.output import GroupState, Stop
from mixserve.engine.request import Request, RequestStatus
from mixserve.engine.scheduler import Scheduler, SchedulerOutput
from mixserve.outputs import FinishReason, RequestOutput, TokenLogprobs
from mixserve.sampling_params import SamplingParams

_PAUSABLE = (FinishReason.STOP, FinishReason.LENGTH)


class RequestError(ValueError):
    """A request was rejected at admission; the message names the field and the value."""


class QueueFullError(RuntimeError):
    """The waiting queue is at `SchedulerConfig.max_num_waiting`."""


@dataclass
class RunnerOutput:
    """Per-request results of one step, keyed by `Request.request_id`."""

    sampled: dict[str, int] = field(default_factory=dict)
    logprobs: dict[str, TokenLogprobs] = field(default_factory=dict)
    prompt_logprobs: dict[str, list[TokenLogprobs]] = field(default_factory=dict)
    """Entries for the prompt positions computed this step (position p predicts token p + 1)."""
    errors: dict[str, str] = field(default_factory=dict)


class ModelRunner(Protocol):
    def execute(self, out: SchedulerOutput) -> RunnerOutput:
        """Run `out.seqs` (possibly none) and free the state of `out.finished_request_ids`."""
        ...


class Tokenizer(Protocol):
    def decode(self, token_ids: list[int], skip_special_tokens: bool = True) -> str: ...


@dataclass(frozen=True)
class ResumePoint:
    """Continue a single-sample request from tokens it already produced elsewhere (failover, migration).

    The request is admitted with `output_token_ids` as its first outputs (their KV is recomputed, or
    found in the prefix cache), so max_tokens, min_tokens, penalties, stop strings and per-position
    seeds behave exactly as in the uninterrupted run; its deltas carry only what comes after them."""

    output_token_ids: tuple[int, ...]
    num_text_sent: int
    """Characters of the sample's text the caller already has (its text resumes from there)."""


@dataclass(frozen=True)
class ModelInfo:
    """What the engine must know about the model, without importing it."""

    max_model_len: int
    vocab_size: int
    eos_token_ids: tuple[int, ...]
    num_blocks: int


class Engine:
    """Continuous batching over a paged KV cache. Not thread-safe: drive it from one thread."""

    def __init__(self, config: EngineConfig, runner: ModelRunner, tokenizer: Tokenizer,
                 info: ModelInfo) -> None:
        self.config = config
        self.runner = runner
        self.tokenizer = tokenizer
        self.info = info
        self.scheduler = Scheduler(config.scheduler, config.cache, info.num_blocks, info.eos_token_ids)
        self.groups: dict[str, GroupState] = {}
        self.requests: dict[str, Request] = {}
        self.paused: dict[str, dict[int, Request]] = {}
        """Paused samples: request id -> sample index -> request (holding its KV blocks)."""
        self.counters = {"prompt_tokens": 0, "generation_tokens": 0, "cached_prompt_tokens": 0,
                         "steps": 0, "errors": 0, "computed_tokens": 0, "recomputed_tokens": 0,
                         "migrated_kv_tokens": 0, "kv_imports_refused": 0}
        """computed_tokens: every token the runner computed; recomputed_tokens: those of them that a resumed
        request (`ResumePoint`) already had (its prompt and resumed outputs, minus prefix-cache hits);
        migrated_kv_tokens: tokens whose KV came in by `import_kv`."""
        self._resumed: dict[str, int] = {}
        """Resumed request id -> its known tokens (prompt + resumed outputs), until they are computed."""

    # -- admission -----------------------------------------------------------------------------
    def add_request(self, request_id: str, prompt_token_ids: Sequence[int], params: SamplingParams,
                    prompt: str | None = None, pause_on_finish: bool = False,
                    resume: ResumePoint | None = None) -> None:
        """Queue a prompt; raises RequestError (bad input) or QueueFullError, queuing nothing.

        `pause_on_finish`: samples that stop normally are paused, not freed (see the module doc).
        `resume`: continue from outputs produced elsewhere (`ResumePoint`; n must be 1)."""
        ids = self._validate(request_id, prompt_token_ids, params)
        outputs = self._validate_resume(ids, params, resume)
        limit = self.config.scheduler.max_num_waiting
        if limit is not None and self.scheduler.num_waiting >= limit:
            raise QueueFullError(f"waiting queue is full ({limit} requests)")
        request = Request(request_id=request_id if params.n == 1 else f"{request_id}#0",
                          group_id=request_id, sample_index=0, prompt_token_ids=ids, params=params,
                          max_model_len=self.info.max_model_len, pause_on_finish=pause_on_finish,
                          fork_at=len(ids) - 1 if params.n > 1 else None, token_ids=ids + outputs)
        group = GroupState(request_id, prompt, ids, params, self.tokenizer, self.info.eos_token_ids)
        self.groups[request_id] = group
        self.counters["prompt_tokens"] += len(ids)
        group.add_sample(request)
        if resume is not None:
            group.restore(0, outputs, resume.num_text_sent)
            self._resumed[request.request_id] = len(ids) + len(outputs)
        self._track(request)
        self.scheduler.add(request)
        if request.fork_at == 0:
            self._fork_pending(request)

    def _validate(self, request_id: str, prompt_token_ids: Sequence[int],
                  params: SamplingParams) -> list[int]:
        if request_id in self.groups or request_id in self.paused:
            raise RequestError(f"request_id {request_id!r} is already in use")
        if not isinstance(params, SamplingParams):
            raise RequestError(f"params must be SamplingParams, got {type(params).__name__}")
        ids = list(prompt_token_ids)
        if not ids:
            raise RequestError("prompt is empty: at least one token is needed")
        bad = [t for t in ids if not isinstance(t, int) or not 0 <= t < self.info.vocab_size]
        if bad:
            raise RequestError(f"prompt token id {bad[0]!r} is outside the vocabulary "
                               f"[0, {self.info.vocab_size})")
        if len(ids) >= self.info.max_model_len:
            raise RequestError(f"prompt has {len(ids)} tokens; the context length is "
                               f"{self.info.max_model_len}, leaving no room to generate")
        if params.prompt_logprobs is not None and params.n > 1:
            raise RequestError("prompt_logprobs with n > 1 is not supported; ask for n=1")
        return ids

    def _validate_resume(self, ids: list[int], params: SamplingParams,
                         resume: ResumePoint | None) -> list[int]:
        if resume is None:
            return []
        if params.n != 1:
            raise RequestError(f"resume needs n=1 (resume each sample on its own), got n={params.n}")
        outputs = list(resume.output_token_ids)
        bad = [t for t in outputs if not isinstance(t, int) or not 0 <= t < self.info.vocab_size]
        if bad:
            raise RequestError(f"resume output token id {bad[0]!r} is outside the vocabulary "
                               f"[0, {self.info.vocab_size})")
        if len(ids) + len(outputs) >= self.info.max_model_len:
            raise RequestError(f"resumed request has {len(ids) + len(outputs)} tokens; the context "
                               f"length is {self.info.max_model_len}")
        if resume.num_text_sent < 0:
            raise RequestError(f"resume num_text_sent must be >= 0, got {resume.num_text_sent}")
        return outputs

    def _track(self, request: Request) -> None:
        self.requests[request.request_id] = request

    # -- the step -----------------------------------------------------------------------------
    def has_unfinished(self) -> bool:
        return bool(self.groups)

    def step(self) -> list[RequestOutput]:
        """One scheduling + forward + sampling round; returns deltas of requests that changed."""
        out = self.scheduler.schedule()
        changed: dict[str, None] = {}  # an ordered set: outputs come in scheduling order, run after run
        if not out.is_empty:
            result = self._execute(out)
            self.scheduler.update(out)
            self.counters["steps"] += 1
            changed = self._apply(out, result)
        elif out.finished_request_ids:  # nothing to run, but the runner frees per-request state
            self._execute(out)
        self._fork_ready()
        outputs = self._collect(changed)
        if not self.groups:  # idle from now on: free what just finished rather than at the next step
            idle = self.scheduler.schedule()
            if idle.finished_request_ids:
                self._execute(idle)
        return outputs

    def _execute(self, out: SchedulerOutput) -> RunnerOutput:
        try:
            return self.runner.execute(out)
        except Exception as exc:  # noqa: BLE001 - isolate the request that fails
            if len(out.seqs) == 1:
                return RunnerOutput(errors={out.seqs[0].request_id: f"{type(exc).__name__}: {exc}"})
        merged = RunnerOutput()
        for i, seq in enumerate(out.seqs):
            single = SchedulerOutput(seqs=[seq], copies=out.copies if i == 0 else [],
                                     finished_request_ids=out.finished_request_ids if i == 0 else [],
                                     block_size=out.block_size)
            part = self._execute(single)
            merged.sampled.update(part.sampled)
            merged.logprobs.update(part.logprobs)
            merged.prompt_logprobs.update(part.prompt_logprobs)
            merged.errors.update(part.errors)
        return merged

    def _apply(self, out: SchedulerOutput, result: RunnerOutput) -> dict[str, None]:
        changed: dict[str, None] = {}
        now = time.monotonic()
        for seq in out.seqs:
            request = self.scheduler.request_of(seq)
            group = self.groups.get(request.group_id)
            if group is None or request.finished:
                continue
            group.on_computed(seq.start_pos, seq.num_tokens, request.num_prompt_tokens)
            rid = request.request_id
            self._count_computed(rid, seq.start_pos, seq.num_tokens)
            if rid in result.errors:
                self.counters["errors"] += 1
                self._stop(request, group.fail(request, result.errors[rid]))
                self._finish(request)
                changed[group.request_id] = None
                continue
            if rid in result.prompt_logprobs:
                group.add_prompt_logprobs(result.prompt_logprobs[rid])
            if rid in result.sampled:
                token = result.sampled[rid]
                self.scheduler.append_token(request, token)
                self.counters["generation_tokens"] += 1
                self._stop(request, group.on_token(request, token, result.logprobs.get(rid), now))
                if request.pause_on_finish and request.finish_reason in _PAUSABLE:
                    self._pause(request)
                elif request.finished or request.finish_reason is not None:
                    self._finish(request)
                changed[group.request_id] = None
        return changed

    def _count_computed(self, request_id: str, start: int, num_tokens: int) -> None:
        self.counters["computed_tokens"] += num_tokens
        known = self._resumed.get(request_id)
        if known is not None:
            self.counters["recomputed_tokens"] += max(0, min(start + num_tokens, known) - start)
            if start + num_tokens >= known:
                del self._resumed[request_id]

    def _stop(self, request: Request, stop: Stop | None) -> None:
        if stop is not None:
            self.scheduler.stop(request, stop.reason, stop.stop_reason, stop.error)

    def _fork_ready(self) -> None:
        for request in self.scheduler.ready_to_fork():
            self._fork_pending(request)

    def _fork_pending(self, parent: Request) -> None:
        """Split a request with n > 1 into its samples, sharing every KV block computed so far."""
        self.scheduler.clear_fork_point(parent)
        group = self.groups[parent.group_id]
        for i in range(1, parent.params.n):
            child = parent.clone(f"{parent.group_id}#{i}", i)
            self._track(child)
            group.add_sample(child)
            self.scheduler.fork(parent, child)

    def _finish(self, request: Request) -> None:
        if request.finish_reason is None:
            self.scheduler.stop(request, FinishReason.ERROR)
            group = self.groups.get(request.group_id)
            if group is not None:
                group.end(request, FinishReason.ERROR)
        self.scheduler.finish(request)
        self.requests.pop(request.request_id, None)
        self._resumed.pop(request.request_id, None)

    def _collect(self, changed: dict[str, None]) -> list[RequestOutput]:
        outputs = []
        for group_id in changed:
            group = self.groups[group_id]
            outputs.append(group.delta())
            if group.finished:
                self.counters["cached_prompt_tokens"] += group.num_cached_tokens
                del self.groups[group_id]
        return outputs

    # -- branching ------------------------------------------------------------------------------
    def fork_request(self, parent_id: str, child_id: str, params: SamplingParams, *,
                     sample_index: int = 0, append_token_ids: Sequence[int] = (),
                     pause_on_finish: bool = False, prompt: str | None = None) -> None:
        """Start request `child_id` from the current tokens of a running or paused sample of
        `parent_id`, plus `append_token_ids`, sharing its KV (see the module doc).

        The child's prompt is that whole context: its outputs and `max_tokens` count from the fork,
        and its `num_cached_tokens` is the number of tokens whose KV it reused. Raises RequestError.
        """
        parent = self._live_sample(parent_id, sample_index)
        if child_id in self.groups or child_id in self.paused:
            raise RequestError(f"request_id {child_id!r} is already in use")
        if not isinstance(params, SamplingParams) or params.n != 1 or params.prompt_logprobs is not None:
            raise RequestError(f"fork params must be SamplingParams with n=1 and no prompt_logprobs, "
                               f"got {params!r}")
        extra = list(append_token_ids)
        bad = [t for t in extra if not isinstance(t, int) or not 0 <= t < self.info.vocab_size]
        if bad:
            raise RequestError(f"append_token_ids: token id {bad[0]!r} is outside the vocabulary")
        if parent.num_tokens + len(extra) >= self.info.max_model_len:
            raise RequestError(f"fork of {parent_id!r} has {parent.num_tokens + len(extra)} tokens; "
                               f"the context length is {self.info.max_model_len}")
        child = parent.branch(child_id, params, extra, pause_on_finish)
        group = GroupState(child_id, prompt, child.prompt_token_ids, params, self.tokenizer,
                           self.info.eos_token_ids)
        self.groups[child_id] = group
        group.add_sample(child)
        self._track(child)
        self.counters["prompt_tokens"] += child.num_prompt_tokens
        self.scheduler.branch(parent, child)

    def _live_sample(self, request_id: str, sample_index: int) -> Request:
        paused = self.paused.get(request_id, {}).get(sample_index)
        if paused is not None:
            return paused
        group = self.groups.get(request_id)
        for request in group.samples if group is not None else []:
            if request.sample_index == sample_index and request.finish_reason is None:
                if request.fork_at is not None:
                    raise RequestError(f"request {request_id!r} is still prefilling; fork it later")
                return request
        raise RequestError(f"request {request_id!r} sample {sample_index} is not live "
                           f"(unknown, finished, aborted or released)")

    def _pause(self, request: Request) -> None:
        self.scheduler.pause(request)
        self.paused.setdefault(request.group_id, {})[request.sample_index] = request
        self.requests.pop(request.request_id, None)
        self._resumed.pop(request.request_id, None)

    def release_request(self, request_id: str, sample_index: int | None = None) -> int:
        """Free paused samples of `request_id` (all, or one); returns how many were released."""
        samples = self.paused.get(request_id, {})
        chosen = list(samples.values()) if sample_index is None else \
            [samples[sample_index]] if sample_index in samples else []
        for request in chosen:
            self._release(request)
        return len(chosen)

    def _release(self, request: Request) -> None:
        samples = self.paused.get(request.group_id, {})
        samples.pop(request.sample_index, None)
        if not samples:
            self.paused.pop(request.group_id, None)
        self.scheduler.finish(request)

    @property
    def num_paused(self) -> int:
        return sum(len(s) for s in self.paused.values())

    # -- KV migration (`kv_transfer`) ---------------------------------------------------------
    def export_kv(self, request_id: str, sample_index: int = 0) -> KVExport | None:
        """The full computed KV blocks of a live sample, as plain data (see `kv_transfer.export_kv`)."""
        return export_kv(self, request_id, sample_index)

    def import_kv(self, export: KVExport) -> int:
        """Cache another engine's exported blocks here; returns tokens imported (0: refused, logged)."""
        return import_kv(self, export)

    # -- cancellation ---------------------------------------------------------------------------
    def abort_request(self, request_id: str) -> RequestOutput | None:
        """Abort every sample of `request_id` (releasing paused ones); returns its final delta
        (None if unknown or already finished)."""
        group = self.groups.get(request_id)
        if group is None:
            self.release_request(request_id)
            return None
        for request in group.samples:
            if request.status is RequestStatus.PAUSED:
                self._release(request)
            elif not request.finished:
                self._stop(request, group.abort(request))
                self._finish(request)
        output = group.delta()
        del self.groups[request_id]
        return output

    # -- introspection ------------------------------------------------------------------------
    def stats(self) -> dict[str, float]:
        pool = self.scheduler.pool
        return {
            "num_running": float(self.scheduler.num_running),
            "num_waiting": float(self.scheduler.num_waiting),
            "kv_cache_usage": pool.usage,
            "num_free_blocks": float(pool.num_free_blocks),
            "num_blocks": float(pool.num_blocks),
            "prefix_cache_queries": float(pool.num_queries),
            "prefix_cache_hits": float(pool.num_hits),
            "num_preemptions": float(self.scheduler.num_preemptions),
            "num_paused": float(self.num_paused),
            **{k: float(v) for k, v in self.counters.items()},
        }
