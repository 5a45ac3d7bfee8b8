"""Typed configuration of the two sides of a split model."""

from __future__ import annotations

from dataclasses import dataclass

from mixserve.edge.codec import Codec

DEFAULT_MAX_FRAME_BYTES = 64 << 20


@dataclass(frozen=True)
class EdgeConfig:
    """How the edge runs layers `[0, split_layer)`, exits early and talks to the cloud."""

    split_layer: int
    """K: the edge runs layers `[0, K)`, the cloud `[K, L)`; the exit head reads layer K's input."""
    exit_threshold: float = 0.8
    """τ: emit the edge's token when the exit head's top probability is >= τ; τ >= 1 always defers
    (a probability that rounds to 1.0 in float32 is not certainty), τ <= 0 never does."""
    codec: Codec = Codec.FP16
    """How hidden states cross the link (fp32 keeps the split bitwise equal to the whole model)."""
    cloud_timeout_s: float = 5.0
    """Deadline for a deferred token; past it the edge emits its own token (standalone fallback)."""
    retry_interval_s: float = 2.0
    """After the link fails, stay standalone this long before trying to reconnect."""
    naive: bool = False
    """Baseline: resend the whole context's hidden states on every deferral (no cloud context)."""
    max_len: int = 2048
    """Most positions (prompt + generated) of one sequence."""

    def __post_init__(self) -> None:
        if self.split_layer < 0:
            raise ValueError(f"invalid split_layer={self.split_layer}: must be >= 0")
        if self.cloud_timeout_s <= 0 or self.retry_interval_s < 0:
            raise ValueError(f"invalid timeouts cloud_timeout_s={self.cloud_timeout_s}, "
                             f"retry_interval_s={self.retry_interval_s}")
        if self.max_len < 2:
            raise ValueError(f"invalid max_len={self.max_len}: must be >= 2")

    @property
    def always_defer(self) -> bool:
        return self.exit_threshold >= 1.0


@dataclass(frozen=True)
class CloudConfig:
    """How the cloud holds layers `[split_layer, L)` and its per-session context."""

    split_layer: int
    """K: the cloud runs layers `[K, L)` and the final head (0: the whole model, for cloud-only)."""
    session_ttl_s: float = 600.0
    """A session untouched this long is evicted (the edge rebuilds it by resending)."""
    memory_budget_bytes: int = 1 << 30
    """KV + pending hidden-state bytes of all sessions; least recently used sessions are evicted."""
    max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES
    """Larger frames are refused."""
    max_session_len: int = 8192
    """Most positions one session may declare."""

    def __post_init__(self) -> None:
        if self.split_layer < 0:
            raise ValueError(f"invalid split_layer={self.split_layer}: must be >= 0")
        if self.session_ttl_s <= 0 or self.memory_budget_bytes <= 0 or self.max_frame_bytes < 64:
            raise ValueError(f"invalid cloud config {self}: ttl, memory budget and frame limit must be positive")
