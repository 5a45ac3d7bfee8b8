"""Synthetic routing with tunable skew, temporal locality and cross-layer affinity.

Random-initialised routers route nearly uniformly with no locality, so they cannot show what a cache
or a predictor buys. `SyntheticRouting` draws routes the way real MoE traces behave (moe-offloading.md
section 0.3): per layer a Zipf popularity over a random permutation of the experts (`zipf_alpha`),
a chance to keep the same token slot's expert from the previous step (`stickiness`, temporal
locality of decode), and a chance to follow a fixed per-layer map from the previous layer's expert
(`affinity`, inter-layer expert affinity). Each token's top-k is drawn without replacement with the
Gumbel-top-k trick. It is a `RouteSource` (plug it into the model with `set_route_source`) and can
also write a `RoutingTrace` offline for the cache simulator.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from mixserve.experts.trace import RoutingTrace, TraceStep

_FORCE = 1e9
"""Score bonus that makes a sticky / affine expert win the top-k draw."""


@dataclass(frozen=True)
class SyntheticRoutingConfig:
    """Shape and statistics of synthetic routes."""

    layer_ids: tuple[int, ...]
    """MoE layers, in forward order."""
    num_experts: int
    """Experts per layer."""
    top_k: int
    """Experts per token."""
    zipf_alpha: float = 1.0
    """Popularity of the expert of rank r is proportional to 1 / (r + 1) ** zipf_alpha (0: uniform)."""
    stickiness: float = 0.5
    """Chance that a token slot keeps the expert it used at the previous step (same layer)."""
    affinity: float = 0.3
    """Chance that a choice follows the previous layer's choice through a fixed expert-to-expert map."""
    seed: int = 0
    """Seeds the permutations, the affinity maps and the draws."""

    def __post_init__(self) -> None:
        if not 1 <= self.top_k <= self.num_experts:
            raise ValueError(f"synthetic routing: top_k={self.top_k} not in [1, {self.num_experts}]")
        for name in ("stickiness", "affinity"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"synthetic routing: {name}={getattr(self, name)} not in [0, 1]")
        if self.zipf_alpha < 0:
            raise ValueError(f"synthetic routing: zipf_alpha={self.zipf_alpha} must be >= 0")


class SyntheticRouting:
    """A `RouteSource` drawing skewed, sticky, layer-affine routes (see the module docstring)."""

    def __init__(self, config: SyntheticRoutingConfig) -> None:
        self.config = c = config
        self.rng = np.random.default_rng(c.seed)
        ranks = np.arange(c.num_experts)
        popularity = 1.0 / (ranks + 1.0) ** c.zipf_alpha
        self.log_p: dict[int, np.ndarray] = {}
        self.affine: dict[int, np.ndarray] = {}
        for layer_idx in c.layer_ids:
            perm = self.rng.permutation(c.num_experts)
            log_p = np.empty(c.num_experts)
            log_p[perm] = np.log(popularity / popularity.sum())
            self.log_p[layer_idx] = log_p
            self.affine[layer_idx] = self.rng.permutation(c.num_experts)
        self.prev_step: dict[int, np.ndarray] = {}
        self.prev_layer_ids: np.ndarray | None = None
        self.last_layer: int | None = None

    def draw(self, layer_idx: int, num_tokens: int) -> np.ndarray:
        """`[num_tokens, top_k]` expert ids for the next call of `layer_idx`."""
        c = self.config
        if self.last_layer is not None and layer_idx <= self.last_layer:
            self.prev_layer_ids = None  # a new forward pass starts
        scores = self.log_p[layer_idx] + self.rng.gumbel(size=(num_tokens, c.num_experts))
        rows = np.arange(num_tokens)[:, None]
        prev = self.prev_step.get(layer_idx)
        if prev is not None:
            sticky = prev[rows[:, 0] % len(prev)]  # [num_tokens, top_k]
            mask = self.rng.random(sticky.shape) < c.stickiness
            np.add.at(scores, (np.broadcast_to(rows, sticky.shape)[mask], sticky[mask]), _FORCE)
        if self.prev_layer_ids is not None and len(self.prev_layer_ids) == num_tokens:
            follow = self.affine[layer_idx][self.prev_layer_ids]
            mask = self.rng.random(follow.shape) < c.affinity
            np.add.at(scores, (np.broadcast_to(rows, follow.shape)[mask], follow[mask]), _FORCE)
        ids = np.argsort(-scores, axis=1, kind="stable")[:, :c.top_k]
        self.prev_step[layer_idx] = ids
        self.prev_layer_ids = ids
        self.last_layer = layer_idx
        return ids

    def route(self, layer_idx: int, topk_ids: torch.Tensor, topk_weights: torch.Tensor
              ) -> tuple[torch.Tensor, torch.Tensor]:
        ids = torch.from_numpy(self.draw(layer_idx, topk_ids.shape[0])).to(topk_ids.dtype)
        return ids, torch.full(ids.shape, 1.0 / self.config.top_k, dtype=topk_weights.dtype)

    def trace(self, tokens_per_step: list[int]) -> RoutingTrace:
        """A trace of `len(tokens_per_step)` forward passes (e.g. `[512] + [1] * 255`: prefill, decode)."""
        trace = RoutingTrace()
        position = 0
        for n in tokens_per_step:
            step = TraceStep(torch.arange(position, position + n), [n])
            position += n
            for layer_idx in self.config.layer_ids:
                ids = torch.from_numpy(self.draw(layer_idx, n))
                step.topk_ids[layer_idx] = ids
                step.topk_weights[layer_idx] = torch.full(ids.shape, 1.0 / self.config.top_k)
            trace.steps.append(step)
        return trace
