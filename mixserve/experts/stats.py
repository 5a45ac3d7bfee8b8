"""Counters of a budgeted expert provider, exported as a flat `dict[str, float]` (for /metrics)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field


@dataclass
class ExpertStats:
    """What the expert cache did since it was created or reset."""

    layer_ids: list[int]
    """MoE layers (for per-layer recall)."""
    steps: int = 0
    """Forward passes (counted at the first MoE layer)."""
    tokens: int = 0
    """Tokens those passes routed."""
    hits: int = 0
    """Requested experts already resident."""
    inflight_hits: int = 0
    """Requested experts whose (prefetch) read was already under way."""
    misses: int = 0
    """Requested experts read on demand."""
    bytes_read: int = 0
    """Bytes read from the store (demand and prefetch)."""
    prefetch_issued: int = 0
    """Predicted prefetch reads started (reads ahead for the next wave of the same step are misses)."""
    prefetch_used: int = 0
    """Prefetched experts later requested."""
    prefetch_wasted: int = 0
    """Prefetched experts evicted unused."""
    stall_seconds: float = 0.0
    """Time the compute thread waited for reads."""
    recall_hits: dict[int, int] = field(default_factory=dict)
    """Per layer: true active experts that had been predicted."""
    recall_total: dict[int, int] = field(default_factory=dict)
    """Per layer: true active experts at steps with a prediction."""

    def __post_init__(self) -> None:
        # Every key up front: `as_dict` may run on another thread (a /metrics scrape) while the
        # compute thread records, and a dict that never changes size is safe to iterate then.
        for i in self.layer_ids:
            self.recall_hits.setdefault(i, 0)
            self.recall_total.setdefault(i, 0)

    def begin_step(self, num_tokens: int) -> None:
        self.steps += 1
        self.tokens += num_tokens

    def record_recall(self, layer_idx: int, num_predicted_true: int, num_true: int) -> None:
        self.recall_hits[layer_idx] += num_predicted_true
        self.recall_total[layer_idx] += num_true

    def layer_recall(self) -> dict[int, float]:
        return {i: (self.recall_hits[i] / self.recall_total[i] if self.recall_total.get(i) else math.nan)
                for i in self.layer_ids}

    def as_dict(self, resident_nbytes: int, budget_nbytes: int) -> dict[str, float]:
        """Flat counters; rates are 0 before any request (NaN recall when nothing was predicted)."""
        requests = self.hits + self.inflight_hits + self.misses
        true_total = sum(self.recall_total.values())
        return {
            "expert_steps": float(self.steps),
            "expert_tokens": float(self.tokens),
            "expert_requests": float(requests),
            "expert_hits": float(self.hits),
            "expert_inflight_hits": float(self.inflight_hits),
            "expert_misses": float(self.misses),
            "expert_hit_rate": (self.hits + self.inflight_hits) / requests if requests else 0.0,
            "expert_bytes_read": float(self.bytes_read),
            "expert_bytes_per_token": self.bytes_read / self.tokens if self.tokens else 0.0,
            "expert_prefetch_issued": float(self.prefetch_issued),
            "expert_prefetch_used": float(self.prefetch_used),
            "expert_prefetch_wasted": float(self.prefetch_wasted),
            "expert_prefetch_recall": (sum(self.recall_hits.values()) / true_total if true_total
                                       else math.nan),
            "expert_stall_seconds": self.stall_seconds,
            "expert_resident_bytes": float(resident_nbytes),
            "expert_budget_bytes": float(budget_nbytes),
        }
