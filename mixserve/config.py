"""Typed, frozen configuration. Every field has a docstring; values are checked at construction."""

from __future__ import annotations

import ast
import inspect
import re
from dataclasses import dataclass, field, fields, replace
from typing import Literal


class FieldError(ValueError):
    """A value is invalid; `field` names the offending field as data (the message names it as text)."""

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


class ConfigError(FieldError):
    """A configuration value is invalid; the message names the field and the value."""


def _require(ok: bool, name: str, value: object, why: str) -> None:
    if not ok:
        raise ConfigError(f"invalid config {name}={value!r}: {why}", field=name)


def field_docs(cls: type) -> dict[str, str]:
    """The docstring under each field of a dataclass, read from its source (one line, whitespace joined)."""
    tree = ast.parse(inspect.getsource(cls))
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs: dict[str, str] = {}
    for stmt, nxt in zip(body, body[1:], strict=False):
        if (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)
                and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant)
                and isinstance(nxt.value.value, str)):
            docs[stmt.target.id] = " ".join(nxt.value.value.split())
    names = {f.name for f in fields(cls)}
    return {k: v for k, v in docs.items() if k in names}


Dtype = Literal["float32", "bfloat16"]
WeightFormat = Literal["auto", "dense", "int8", "int4"]


@dataclass(frozen=True)
class ModelConfig:
    """Which checkpoint to run and in which numeric format."""

    model: str = "smollm2-135m"
    """Known model name (see `mixserve models`) or a path to an HF folder or a .gguf file."""
    dtype: Dtype = "float32"
    """Activation dtype (and dense-weight dtype)."""
    weight_format: WeightFormat = "auto"
    """dense: weights in `dtype`. int8: every Linear runs int8 per-channel weights (4x fewer bytes per
    token than float32). int4: every Linear runs int4 weights in groups of 32 (8x fewer; int8 where a
    shape does not fit the kernel). auto: for GGUF checkpoints int4 where the stored weights are
    4-bit (Q4_0/Q4_1/Q4_K, re-encoded exactly) and int8 elsewhere; dense for HF checkpoints.
    Quantized weights serve every batch size, prefill and decode alike."""
    max_model_len: int | None = None
    """Context length cap (prompt + output); None: the model's own limit, at most 8192."""
    num_threads: int | None = None
    """torch intra-op threads; None: all cores."""
    batch_invariant: bool = False
    """Make a request's tokens and logprobs bitwise independent of the rest of the batch, of prompt
    chunking and of prefix-cache hits (fixed-tile fp32 matmuls, per-query attention; slower, see
    BENCHMARKS.md). Off: results may differ in the last bits with the batch."""

    def __post_init__(self) -> None:
        _require(bool(self.model), "model", self.model, "must be a name or a path")
        _require(self.dtype in ("float32", "bfloat16"), "dtype", self.dtype, "float32 or bfloat16")
        _require(self.weight_format in ("auto", "dense", "int8", "int4"), "weight_format",
                 self.weight_format, "auto, dense, int8 or int4")
        _require(self.max_model_len is None or self.max_model_len >= 2, "max_model_len",
                 self.max_model_len, "must be >= 2")
        _require(self.num_threads is None or self.num_threads >= 1, "num_threads", self.num_threads,
                 "must be >= 1")


@dataclass(frozen=True)
class CacheConfig:
    """Paged KV cache: block geometry, size and prefix caching."""

    block_size: int = 16
    """Tokens per KV block."""
    num_blocks: int | None = None
    """Blocks in the pool; None: derived from kv_cache_bytes."""
    kv_cache_bytes: int = 1 << 30
    """Memory for K and V of all layers when num_blocks is None."""
    enable_prefix_caching: bool = True
    """Reuse full blocks whose token chain hash matches a cached block."""

    def __post_init__(self) -> None:
        _require(self.block_size >= 1, "block_size", self.block_size, "must be >= 1")
        _require(self.num_blocks is None or self.num_blocks >= 1, "num_blocks", self.num_blocks,
                 "must be >= 1")
        _require(self.kv_cache_bytes > 0, "kv_cache_bytes", self.kv_cache_bytes, "must be > 0")


@dataclass(frozen=True)
class SchedulerConfig:
    """Per-step token budget and batch limits of the phase-less scheduler."""

    max_num_batched_tokens: int = 512
    """Tokens computed per step over all requests; long prompts are chunked to fit."""
    max_num_seqs: int = 128
    """Requests running at once."""
    enable_chunked_prefill: bool = True
    """Split a prompt over several steps when it exceeds the remaining budget."""
    max_num_waiting: int | None = None
    """Reject new requests (QueueFullError) once this many wait; None: unbounded."""

    def __post_init__(self) -> None:
        _require(self.max_num_batched_tokens >= 1, "max_num_batched_tokens",
                 self.max_num_batched_tokens, "must be >= 1")
        _require(self.max_num_seqs >= 1, "max_num_seqs", self.max_num_seqs, "must be >= 1")
        _require(self.max_num_waiting is None or self.max_num_waiting >= 0, "max_num_waiting",
                 self.max_num_waiting, "must be >= 0")


_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40}
_SIZE = re.compile(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z%]*)\s*")


@dataclass(frozen=True)
class ExpertBudget:
    """A parsed expert memory budget: absolute bytes, or a fraction of all expert bytes."""

    num_bytes: int | None
    """Bytes of resident experts; None when the budget is a fraction."""
    fraction: float | None
    """Share of the bytes all experts take resident, in (0, 1]; None when the budget is in bytes."""

    @staticmethod
    def parse(text: str, name: str = "expert_memory_budget") -> ExpertBudget:
        """`2GiB`, `512MB`, `1000000` (bytes), `25%` or `0.25` (a number with a point: a fraction).

        Raises ConfigError naming `name` and the value for anything else."""
        m = _SIZE.fullmatch(str(text))
        unit = m[2].lower() if m else ""
        if m is None or (unit not in _UNITS and unit != "%"):
            raise ConfigError(f"invalid config {name}={text!r}: expected bytes with a unit (2GiB, 512MB), "
                              f"a percentage (25%) or a fraction of expert bytes (0.25)", field=name)
        value = float(m[1])
        if unit == "%" or (unit == "" and "." in m[1]):
            fraction = value / 100 if unit == "%" else value
            _require(0 < fraction <= 1, name, text, "a fraction of expert bytes must be in (0, 1]")
            return ExpertBudget(None, fraction)
        num_bytes = int(value * _UNITS[unit])
        _require(num_bytes > 0, name, text, "must be > 0 bytes")
        return ExpertBudget(num_bytes, None)

    def resolve(self, total_expert_bytes: int) -> int:
        """Budget in bytes for a model whose experts take `total_expert_bytes` when all resident."""
        if self.num_bytes is not None:
            return self.num_bytes
        assert self.fraction is not None
        return int(self.fraction * total_expert_bytes)


EvictionPolicyName = Literal["lru", "lfu", "lfru"]
PrefetchName = Literal["none", "router", "affinity", "gate", "pregate"]


@dataclass(frozen=True)
class ExpertConfig:
    """MoE experts under a memory budget. `memory_budget` is the one knob; the rest have good defaults."""

    memory_budget: str | None = None
    """Resident expert memory: `2GiB`, `512MB`, `25%` or `0.25` of all expert bytes. None: every expert
    resident (unless the model is an expert pack, experts load from the checkpoint into RAM)."""
    policy: EvictionPolicyName = "lfru"
    """Which resident expert a full layer cache evicts: lru, lfu or lfru (frequency with recency decay)."""
    prefetch: PrefetchName = "router"
    """Which experts to read ahead: router (layer L+1's router on layer L's hidden state), affinity (online
    layer-to-layer expert co-occurrence counts), gate (the learned d-layer-ahead gates in the model's
    `aheadgate.safetensors`: best recall), pregate (the pre-gating router in `pregate.safetensors`: every
    layer's experts at the first MoE layer), or none (load on demand only). gate and pregate are written by
    `mixserve moefy` / `mixserve refit-pregate`."""
    prefetch_top_m: int | None = None
    """Experts per token predicted and prefetched; None: the model's top-k (router, affinity) or the
    per-layer widths stored with the gate (gate, pregate)."""
    io_threads: int = 2
    """Background threads reading experts from the store."""
    direct_io: bool = False
    """Read the expert store with O_DIRECT (bypass the OS page cache)."""
    verify_checksums: bool = True
    """Check each expert's crc32 against the pack manifest the first time it is read."""
    pack_dir: str | None = None
    """Where an unpacked checkpoint is packed on first use with a budget; None: `<cache dir>/packs`."""

    def __post_init__(self) -> None:
        if self.memory_budget is not None:
            ExpertBudget.parse(self.memory_budget, "experts.memory_budget")
        _require(self.policy in ("lru", "lfu", "lfru"), "experts.policy", self.policy, "lru, lfu or lfru")
        _require(self.prefetch in ("none", "router", "affinity", "gate", "pregate"), "experts.prefetch",
                 self.prefetch, "none, router, affinity, gate or pregate")
        _require(self.prefetch_top_m is None or self.prefetch_top_m >= 1, "experts.prefetch_top_m",
                 self.prefetch_top_m, "must be >= 1")
        _require(self.io_threads >= 1, "experts.io_threads", self.io_threads, "must be >= 1")

    @property
    def budget(self) -> ExpertBudget | None:
        """The parsed `memory_budget` (None when unset)."""
        return None if self.memory_budget is None else ExpertBudget.parse(self.memory_budget)


@dataclass(frozen=True)
class EngineConfig:
    """Everything an engine needs, in one value."""

    model: ModelConfig = field(default_factory=ModelConfig)
    """Model and numerics."""
    cache: CacheConfig = field(default_factory=CacheConfig)
    """KV cache."""
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    """Scheduling limits."""
    experts: ExpertConfig = field(default_factory=ExpertConfig)
    """MoE experts: memory budget, cache policy, prefetch (ignored for dense models)."""

    @staticmethod
    def flat_fields() -> dict[str, tuple[str, str]]:
        """Flat option name -> (section, field): every field of every section, the expert fields
        prefixed `expert_` (`expert_memory_budget`). `LLM(**options)` and the CLI flags use these names."""
        out: dict[str, tuple[str, str]] = {}
        for section, prefix in SECTION_PREFIXES.items():
            for f in fields(SECTION_TYPES[section]):
                out[prefix + f.name] = (section, f.name)
        return out

    def with_options(self, **options: object) -> EngineConfig:
        """A copy with flat options replaced (see `flat_fields`); an unknown name is a ConfigError."""
        known = EngineConfig.flat_fields()
        changes: dict[str, dict[str, object]] = {}
        for name, value in options.items():
            if name not in known:
                raise ConfigError(f"unknown engine option {name!r}; known options: {', '.join(known)}",
                                  field=name)
            section, key = known[name]
            changes.setdefault(section, {})[key] = value
        return replace(self, **{section: replace(getattr(self, section), **values)
                                for section, values in changes.items()})


SECTION_TYPES: dict[str, type] = {"model": ModelConfig, "cache": CacheConfig, "scheduler": SchedulerConfig,
                                  "experts": ExpertConfig}
SECTION_PREFIXES = {"model": "", "cache": "", "scheduler": "", "experts": "expert_"}
