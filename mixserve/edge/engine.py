"""`EdgeEngine`: the `AsyncEngine` surface the OpenAI routes of `mixserve serve` use, over one `EdgeLLM`.

The edge is one device running one sequence at a time: requests queue, and the samples of a request
(n > 1) run one after another as independent cloud sessions, each seeded as the engine seeds sample i
(`derive_seed`). Text, stop strings, stop token ids, min_tokens, max_tokens and logprobs go through the
engine's own `GroupState`, so the deltas are exactly the engine's; the split shows only in the
per-request usage (`usage_extra`). Refused up front with a 400 naming the field: structured output
(the constraint would have to run on both sides) and prompt logprobs (echo + logprobs: the edge has no
full-model logits of the prompt).
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from mixserve.edge.api import EdgeLLM
from mixserve.edge.edge import Stopping
from mixserve.edge.sampling import for_sample
from mixserve.engine.async_engine import EngineDeadError, _QueueSink
from mixserve.engine.output import GroupState
from mixserve.engine.request import Request
from mixserve.engine.scheduler import derive_seed
from mixserve.outputs import FinishReason, RequestOutput, TokenLogprobs
from mixserve.sampling_params import SamplingParams
from mixserve.server.errors import ApiError

USAGE_KEYS = ("edge_tokens", "cloud_tokens", "standalone_tokens", "link_bytes_sent", "link_bytes_received")
_MAX_USAGE = 4096
"""Usage of this many recent requests is kept for the server to read once they finished."""


@dataclass
class _Job:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    prompt: str | None
    sink: _QueueSink


class EdgeEngine:
    """Queue of requests in front of one `EdgeLLM`, run on a worker thread; call `start()` once."""

    def __init__(self, llm: EdgeLLM) -> None:
        self.llm = llm
        self.error: str | None = None
        self.listeners: list[Callable[[list[RequestOutput]], None]] = []
        self.usage: OrderedDict[str, dict[str, int]] = OrderedDict()
        self._jobs: queue.Queue[_Job | None] = queue.Queue()
        self._aborted: set[str] = set()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._running = 0
        self._counts = {"prompt_tokens": 0, "generation_tokens": 0}

    @property
    def stats(self) -> dict[str, float]:
        return {"num_running": self._running, "num_waiting": self._jobs.qsize(), **self._counts}

    @property
    def healthy(self) -> bool:
        return self.error is None and self._thread is not None and self._thread.is_alive()

    def new_id(self, kind: str = "req") -> str:
        return f"{kind}-{uuid.uuid4().hex}"

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="mixserve-edge", daemon=True)
        self._thread.start()

    def shutdown(self, timeout_s: float = 10.0) -> None:
        if self._thread is None:
            return
        self._jobs.put(None)
        self._thread.join(timeout_s)
        self.error = self.error or "the server is shutting down"
        while True:
            try:
                job = self._jobs.get_nowait()
            except queue.Empty:
                break
            if job is not None:
                job.sink.fail(EngineDeadError("the server is shutting down"))

    async def add(self, request_id: str, prompt_token_ids: Sequence[int], params: SamplingParams,
                  prompt: str | None = None, queue: asyncio.Queue[RequestOutput | BaseException] | None = None,
                  resume: Any = None) -> asyncio.Queue[RequestOutput | BaseException]:
        """Queue a request (refusing what the split model cannot do); its deltas arrive on the queue."""
        if not self.healthy:
            raise EngineDeadError(self.error or "the edge is not running")
        if params.structured is not None:
            raise ApiError(400, "invalid field response_format: structured output (response_format, guided_*, "
                                "structured_outputs, tool_choice=required) is not supported by the split edge "
                                "model", param="response_format")
        if params.prompt_logprobs is not None:
            raise ApiError(400, "invalid field echo: prompt logprobs (echo with logprobs) are not supported by "
                                "the split edge model", param="echo")
        if resume is not None:
            raise ApiError(400, "resuming a sample is not supported by the split edge model")
        queue = queue if queue is not None else asyncio.Queue()
        self._jobs.put(_Job(request_id, list(prompt_token_ids), params, prompt,
                            _QueueSink(asyncio.get_running_loop(), queue)))
        return queue

    def abort(self, request_id: str) -> None:
        with self._lock:
            self._aborted.add(request_id)

    def _is_aborted(self, request_id: str) -> bool:
        with self._lock:
            return request_id in self._aborted

    # -- worker thread ----------------------------------------------------------------------------
    def _loop(self) -> None:
        while (job := self._jobs.get()) is not None:
            self._running = 1
            try:
                self._run(job)
            except Exception as exc:  # noqa: BLE001 - a bug: fail this request, keep serving
                job.sink.fail(exc)
            finally:
                self._running = 0
                with self._lock:
                    self._aborted.discard(job.request_id)

    def _emit(self, job: _Job, group: GroupState) -> None:
        out = group.delta()
        for listener in self.listeners:
            listener([out])
        job.sink.put(out)

    def _run(self, job: _Job) -> None:
        llm, params = self.llm, job.params
        group = GroupState(job.request_id, job.prompt, job.prompt_ids, params, llm.tokenizer,
                           tuple(llm.tokenizer.eos_token_ids))
        samples = [Request(f"{job.request_id}#{i}", job.request_id, i, job.prompt_ids, params, llm.config.max_len)
                   for i in range(params.n)]
        for request in samples:
            group.add_sample(request)
        usage = dict.fromkeys(USAGE_KEYS, 0)
        self._counts["prompt_tokens"] += len(job.prompt_ids) * params.n
        stopping = Stopping(params.ignore_eos, params.min_tokens, params.stop_token_ids)
        max_tokens = min(params.max_tokens or llm.config.max_len, llm.config.max_len - len(job.prompt_ids))
        for request in samples:
            if self._is_aborted(job.request_id):
                group.abort(request)
                continue

            def on_step(token: int, source: str, entry: TokenLogprobs, request: Request = request) -> bool:
                request.token_ids.append(token)
                self._counts["generation_tokens"] += 1
                stop = group.on_token(request, token, entry if params.logprobs is not None else None,
                                      time.monotonic())
                if stop is None and self._is_aborted(job.request_id):
                    stop = group.abort(request)
                if stop is None:
                    self._emit(job, group)
                return stop is not None

            sampling = for_sample(params, len(job.prompt_ids), derive_seed(params.seed, request.sample_index))
            try:
                result = llm.runner.generate(job.prompt_ids, max_tokens, sampling=sampling, stopping=stopping,
                                             on_step=on_step)
            except Exception as exc:  # noqa: BLE001 - this sample fails, the others (and the server) go on
                group.fail(request, f"{type(exc).__name__}: {exc}")
                continue
            group.end(request, FinishReason.LENGTH)  # unless a stop was recorded
            for key in USAGE_KEYS:
                usage[key] += result.usage[key]
            self._publish(job.request_id, usage)
            self._emit(job, group)  # this sample's end (the request's, after its last sample)
        self._publish(job.request_id, usage)
        if any(not state.finish_sent for state in group.states.values()):  # failed or aborted samples
            self._emit(job, group)

    def _publish(self, request_id: str, usage: dict[str, int]) -> None:
        with self._lock:
            self.usage[request_id] = dict(usage)
            while len(self.usage) > _MAX_USAGE:
                self.usage.popitem(last=False)

    def usage_extra(self, request_ids: list[str]) -> dict[str, int]:
        """Split usage summed over the engine requests of one HTTP request, plus `deferred_tokens`."""
        total = dict.fromkeys(USAGE_KEYS, 0)
        with self._lock:
            for rid in request_ids:
                for key, value in self.usage.get(rid, {}).items():
                    total[key] += value
        return {**total, "deferred_tokens": total["cloud_tokens"] + total["standalone_tokens"]}
