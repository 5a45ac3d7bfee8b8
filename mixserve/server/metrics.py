"""Prometheus metrics with vLLM's names under the `mixserve:` prefix (same suffixes, `model_name` label).

Gauges and engine counters are read from the engine's stats snapshot at scrape time; latency and size
histograms and per-finish-reason request counts are observed by the server as requests finish. Each
server has its own registry (no global state).

Prompt-token counters that add up (`PromptTokens`, fed every engine output by a dispatcher listener):
`prompt_tokens_admitted` counts every sample's context (a request of n samples over an L-token prompt
admits n * L; a fork admits its whole context), `prompt_tokens_prefilled` what the runner computed at
prompt positions, `prompt_tokens_reused_prefix_cache` prefix-cache hits in tokens (hit blocks *
block_size), `prompt_tokens_reused_fork` the rest of the reuse (samples and forks sharing KV), so
prefilled + reused_prefix_cache + reused_fork = admitted. `scaling_verifier_tokens` counts the tokens
strategy verifiers (the judge) prefilled and generated. The engine's `prompt_tokens` stays what it was:
prompt tokens of requests as added (once per request, not per sample).
"""

from __future__ import annotations

import copy
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from mixserve.outputs import RequestOutput

PREFIX = "mixserve:"
_LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                    20.0, 40.0, 80.0)
_SIZE_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000)

# engine stats key -> (metric suffix, help); exposed as counters (`_total` added by the client library)
_ENGINE_COUNTERS = {
    "prompt_tokens": ("prompt_tokens", "Prompt tokens admitted."),
    "generation_tokens": ("generation_tokens", "Tokens generated."),
    "prefix_cache_queries": ("prefix_cache_queries", "Prompt blocks looked up in the prefix cache."),
    "prefix_cache_hits": ("prefix_cache_hits", "Prompt blocks found in the prefix cache."),
    "num_preemptions": ("num_preemptions", "Requests preempted for lack of KV blocks."),
}


class PromptTokens:
    """Admitted and prefilled prompt tokens from the outputs' cumulative counts (see the module doc).

    `observe` runs on the engine thread with every step's outputs; requests are tracked from their first
    output until they finish (at most `max_tracked` at once; the oldest are dropped beyond that, which
    only happens when requests are aborted behind the dispatcher's back by the thousands)."""

    def __init__(self, max_tracked: int = 100_000) -> None:
        self.admitted = 0
        self.prefilled = 0
        self.max_tracked = max_tracked
        self._live: OrderedDict[str, tuple[int, int]] = OrderedDict()  # id -> (samples seen, prefilled seen)

    def observe(self, outputs: Sequence[RequestOutput]) -> None:
        for out in outputs:
            samples, prefilled = self._live.pop(out.request_id, (0, 0))
            now_samples = max([samples, *(o.index + 1 for o in out.outputs)])
            now_prefilled = max(prefilled, out.metrics.num_computed_prompt_tokens)
            self.admitted += len(out.prompt_token_ids) * (now_samples - samples)
            self.prefilled += now_prefilled - prefilled
            if not out.finished:
                self._live[out.request_id] = (now_samples, now_prefilled)
                if len(self._live) > self.max_tracked:
                    self._live.popitem(last=False)


class _EngineCollector(Collector):
    def __init__(self, model_name: str, stats: Callable[[], dict[str, float]],
                 extra: Callable[[], dict[str, float]], prompt: PromptTokens | None = None,
                 block_size: int = 0) -> None:
        self.model_name = model_name
        self.stats = stats
        self.extra = extra
        self.prompt = prompt
        self.block_size = block_size

    def collect(self) -> Iterator[Metric]:
        s = self.stats()
        labels = ["model_name"]

        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            g = GaugeMetricFamily(PREFIX + name, doc, labels=labels)
            g.add_metric([self.model_name], value)
            return g

        yield gauge("num_requests_running", "Sequences running in the current step.", s.get("num_running", 0))
        yield gauge("num_requests_waiting", "Sequences waiting to be scheduled.", s.get("num_waiting", 0))
        yield gauge("kv_cache_usage_perc", "Fraction of KV-cache blocks in use (1 = full).",
                    s.get("kv_cache_usage", 0.0))
        yield gauge("num_kv_blocks", "KV-cache blocks in the pool.", s.get("num_blocks", 0))
        for key, (suffix, doc) in _ENGINE_COUNTERS.items():
            c = CounterMetricFamily(PREFIX + suffix, doc, labels=labels)
            c.add_metric([self.model_name], s.get(key, 0.0))
            yield c
        if self.prompt is not None:
            prefix = int(s.get("prefix_cache_hits", 0.0)) * self.block_size
            fork = max(self.prompt.admitted - self.prompt.prefilled - prefix, 0)
            for suffix, doc, amount in (
                    ("prompt_tokens_admitted", "Prompt tokens of every sample's context (n samples: n * prompt).",
                     self.prompt.admitted),
                    ("prompt_tokens_prefilled", "Prompt tokens the runner computed.", self.prompt.prefilled),
                    ("prompt_tokens_reused_prefix_cache", "Prompt tokens served from the prefix cache.", prefix),
                    ("prompt_tokens_reused_fork", "Prompt tokens shared between samples and forks.", fork)):
                c = CounterMetricFamily(PREFIX + suffix, doc, labels=labels)
                c.add_metric([self.model_name], float(amount))
                yield c
        for key, value in sorted(self.extra().items()):
            yield gauge(key, f"{key} (model-specific statistic).", value)


@dataclass
class _Timing:
    arrival: float
    last: float | None = None
    first: float | None = None
    num_tokens: int = 0


@dataclass
class ServerMetrics:
    """All metrics of one server. `observe()` is fed every delta of a request; `finish()` once at the end."""

    model_name: str
    stats: Callable[[], dict[str, float]]
    extra: Callable[[], dict[str, float]] = lambda: {}
    registry: CollectorRegistry = field(default_factory=CollectorRegistry)
    engine_collector: bool = True
    """Register the engine gauges/counters for `stats` (a multi-model server collects them per model itself)."""

    def view(self, model_name: str) -> ServerMetrics:
        """The same metrics (shared registry and series) observed under another `model_name` label."""
        other = copy.copy(self)
        other.model_name = model_name
        return other

    block_size: int = 0
    """KV block size: prefix-cache hits (blocks) in tokens; 0 leaves the prompt-token counters out."""
    prompt_tokens: PromptTokens = field(default_factory=PromptTokens)
    """Feed it every engine output (`AsyncEngine.listeners`)."""

    def __post_init__(self) -> None:
        r, labels = self.registry, ["model_name"]
        self.ttft = Histogram(PREFIX + "time_to_first_token_seconds", "Time to first token.", labels,
                              registry=r, buckets=_LATENCY_BUCKETS)
        self.itl = Histogram(PREFIX + "inter_token_latency_seconds", "Time between consecutive tokens.",
                             labels, registry=r, buckets=_LATENCY_BUCKETS)
        self.e2e = Histogram(PREFIX + "e2e_request_latency_seconds", "Request latency, arrival to finish.",
                             labels, registry=r, buckets=_LATENCY_BUCKETS)
        self.prompt_len = Histogram(PREFIX + "request_prompt_tokens", "Prompt tokens per request.", labels,
                                    registry=r, buckets=_SIZE_BUCKETS)
        self.gen_len = Histogram(PREFIX + "request_generation_tokens", "Generated tokens per request.", labels,
                                 registry=r, buckets=_SIZE_BUCKETS)
        self.success = Counter(PREFIX + "request_success", "Finished requests by finish reason.",
                               labels + ["finished_reason"], registry=r)
        self.http_errors = Counter(PREFIX + "request_errors", "Requests answered with an error, by status.",
                                   labels + ["status"], registry=r)
        self.verifier_tokens = Counter(PREFIX + "scaling_verifier_tokens",
                                       "Tokens strategy verifiers prefilled and generated.", labels, registry=r)
        if self.engine_collector:
            r.register(_EngineCollector(self.model_name, self.stats, self.extra,
                                        self.prompt_tokens if self.block_size else None, self.block_size))

    def start(self) -> _Timing:
        return _Timing(arrival=time.monotonic())

    def observe(self, timing: _Timing, delta: RequestOutput) -> None:
        num = sum(len(o.token_ids) for o in delta.outputs)
        if num == 0:
            return
        now = time.monotonic()
        if timing.first is None:
            timing.first = now
            self.ttft.labels(self.model_name).observe(now - timing.arrival)
        elif timing.last is not None:
            gap = (now - timing.last) / num
            for _ in range(num):
                self.itl.labels(self.model_name).observe(gap)
        timing.last = now
        timing.num_tokens += num

    def finish(self, timing: _Timing, prompt_lens: list[int], reasons: list[str]) -> None:
        """Record a finished request: its prompts' lengths and each choice's finish reason."""
        self.e2e.labels(self.model_name).observe(time.monotonic() - timing.arrival)
        self.gen_len.labels(self.model_name).observe(timing.num_tokens)
        for n in prompt_lens:
            self.prompt_len.labels(self.model_name).observe(n)
        for reason in reasons:
            self.success.labels(self.model_name, reason).inc()

    def error(self, status: int) -> None:
        self.http_errors.labels(self.model_name, str(status)).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
