"""Typed, frozen configuration. Every field has a docstring; values are checked at construction."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the field and the value."""


def _require(ok: bool, name: str, value: object, why: str) -> None:
    if not ok:
        raise ConfigError(f"invalid config {name}={value!r}: {why}")


Dtype = Literal["float32", "bfloat16"]
WeightFormat = Literal["auto", "dense", "int8"]


@dataclass(frozen=True)
class ModelConfig:
    """Which checkpoint to run and in which numeric format."""

    model: str = "smollm2-135m"
    """Known model name (see `mixserve models`) or a path to an HF folder or a .gguf file."""
    dtype: Dtype = "float32"
    """Activation dtype (and dense-weight dtype)."""
    weight_format: WeightFormat = "auto"
    """dense: weights in `dtype`. int8: also keep int8 per-channel weights for small batches (decode),
    which reads 4x fewer bytes per token. auto: int8 for GGUF checkpoints (already quantized), dense else."""
    max_model_len: int | None = None
    """Context length cap (prompt + output); None: the model's own limit, at most 8192."""
    num_threads: int | None = None
    """torch intra-op threads; None: all cores."""

    def __post_init__(self) -> None:
        _require(bool(self.model), "model", self.model, "must be a name or a path")
        _require(self.dtype in ("float32", "bfloat16"), "dtype", self.dtype, "float32 or bfloat16")
        _require(self.weight_format in ("auto", "dense", "int8"), "weight_format", self.weight_format,
                 "auto, dense or int8")
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


@dataclass(frozen=True)
class EngineConfig:
    """Everything an engine needs, in one value."""

    model: ModelConfig = field(default_factory=ModelConfig)
    """Model and numerics."""
    cache: CacheConfig = field(default_factory=CacheConfig)
    """KV cache."""
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    """Scheduling limits."""
