"""Splitting one FFN's neurons into a shared expert and E equal routed experts, and fitting its router.

- Shared expert: the `num_shared` neurons with the largest mean |activation| on the calibration text
  (the "always on" neurons of MoEfication/Read-ME).
- Routed experts, two methods, both balanced (every expert gets exactly `expert_size` neurons):
  `coactivation` clusters neurons by their activation pattern over calibration tokens (neurons that fire
  together land in one expert, so a token needs few experts); `kmeans` clusters the rows of the gate
  projection (MoEfication's parameter clustering). Balanced assignment: k-means centres, then neurons
  assigned greedily by increasing distance to centres that still have room.
- Router: closed-form ridge regression from the FFN input `x` to each expert's share of the token's
  activation mass, sum |h| over the expert's neurons divided by the sum over all routed neurons.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

Method = Literal["coactivation", "kmeans"]


@dataclass(frozen=True)
class NeuronSplit:
    """Which intermediate neurons of one FFN go where."""

    shared: torch.Tensor
    """`[num_shared]` int64 neuron ids of the shared expert (sorted)."""
    experts: torch.Tensor
    """`[num_experts, expert_size]` int64 neuron ids of each routed expert (each row sorted)."""


def balanced_kmeans(features: torch.Tensor, num_clusters: int, *, iters: int = 12, seed: int = 0) -> torch.Tensor:
    """`[n, d]` rows -> `[num_clusters, n // num_clusters]` row ids, every cluster the same size.

    `n` must be a multiple of `num_clusters`. Lloyd iterations with a capacity-constrained assignment
    (all (row, centre) pairs by increasing distance, taken while the centre has room)."""
    n = features.shape[0]
    if n % num_clusters:
        raise ValueError(f"{n} rows cannot split into {num_clusters} equal clusters")
    size = n // num_clusters
    gen = torch.Generator().manual_seed(seed)
    centres = features[torch.randperm(n, generator=gen)[:num_clusters]].clone()
    assign = torch.zeros(n, dtype=torch.long)
    for _ in range(iters):
        dist = torch.cdist(features, centres)  # [n, num_clusters]
        assign = _capacity_assign(dist, size)
        for c in range(num_clusters):
            centres[c] = features[assign == c].mean(0)
    return torch.stack([torch.nonzero(assign == c).flatten() for c in range(num_clusters)])


def _capacity_assign(dist: torch.Tensor, size: int) -> torch.Tensor:
    """Each row to its nearest centre with room, rows decided in order of their best distance."""
    n, k = dist.shape
    room = [size] * k
    assign = torch.full((n,), -1, dtype=torch.long)
    order = torch.argsort(dist, dim=1).tolist()
    for row in torch.argsort(dist.min(dim=1).values).tolist():
        for c in order[row]:
            if room[c]:
                room[c] -= 1
                assign[row] = c
                break
    return assign


def _coactivation_features(h: torch.Tensor, dims: int = 64) -> torch.Tensor:
    """`[num_tokens, inter]` activations -> `[inter, dims]` neuron features: each neuron's |activation|
    pattern over tokens (unit norm), reduced to its top principal directions."""
    a = h.abs().T  # [inter, num_tokens]
    a = a / a.norm(dim=1, keepdim=True).clamp(min=1e-12)
    q = min(dims, a.shape[0], a.shape[1])
    u, s, _ = torch.svd_lowrank(a - a.mean(0), q=q, niter=4)
    return u * s


def split_neurons(h: torch.Tensor, gate_weight: torch.Tensor, num_experts: int, num_shared: int,
                  method: Method, seed: int = 0) -> NeuronSplit:
    """One layer's split (see the module docstring). `h` `[num_tokens, inter]`, `gate_weight` `[inter, hidden]`."""
    inter = gate_weight.shape[0]
    importance = h.abs().mean(0)  # [inter]
    shared = torch.sort(torch.argsort(importance, descending=True)[:num_shared]).values
    rest_mask = torch.ones(inter, dtype=torch.bool)
    rest_mask[shared] = False
    rest = torch.nonzero(rest_mask).flatten()
    if method == "coactivation":
        features = _coactivation_features(h[:, rest])
    elif method == "kmeans":
        w = gate_weight[rest].float()
        features = w / w.norm(dim=1, keepdim=True).clamp(min=1e-12)
    else:
        raise ValueError(f"unknown method {method!r}; expected 'coactivation' or 'kmeans'")
    groups = balanced_kmeans(features, num_experts, seed=seed)
    experts = torch.sort(rest[groups], dim=1).values
    return NeuronSplit(shared=shared, experts=experts)


def expert_mass(h: torch.Tensor, split: NeuronSplit) -> torch.Tensor:
    """`[num_tokens, num_experts]`: each expert's share of the token's routed activation mass."""
    a = h.abs()
    mass = torch.stack([a[:, idx].sum(1) for idx in split.experts], dim=1)
    return mass / mass.sum(1, keepdim=True).clamp(min=1e-12)


def fit_router(x: torch.Tensor, target: torch.Tensor, ridge: float = 1e-2) -> torch.Tensor:
    """Ridge regression `x [n, hidden] -> target [n, num_experts]`; returns W `[num_experts, hidden]`
    with `x @ W^T ~ target` (no bias: the Qwen2-MoE router has none)."""
    x = x.double()
    gram = x.T @ x
    gram += ridge * gram.diagonal().mean() * torch.eye(gram.shape[0], dtype=gram.dtype)
    w = torch.linalg.solve(gram, x.T @ target.double())  # [hidden, num_experts]
    return w.T.float().contiguous()


def topk_recall(scores: torch.Tensor, target: torch.Tensor, k: int) -> float:
    """Share of the target's top-k experts that the scores' top-k also pick (mean over tokens)."""
    pred = torch.zeros_like(target, dtype=torch.bool).scatter_(1, scores.topk(k, dim=1).indices, True)
    true = torch.zeros_like(target, dtype=torch.bool).scatter_(1, target.topk(k, dim=1).indices, True)
    return float((pred & true).sum() / true.sum())
