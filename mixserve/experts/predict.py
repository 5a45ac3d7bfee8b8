"""Next-layer expert prediction: which experts the next MoE layer will want, before it routes.

Both predictors are training-free and are called once per MoE layer per step with that layer's
input hidden state and its true routing; each returns the next MoE layer and a ranked list of
experts (the union of every token's top-m, best aggregate score first):

- `RouterLookahead` applies layer L+1's `Router` to layer L's hidden state (mixtral-offloading's
  speculative loading, AdapMoE, Fate: ~97% accuracy reported). The residual stream changes little
  between adjacent layers, so the next router's choice on the current state is a good guess.
- `AffinityPredictor` counts, online, how often expert a in layer L co-occurs in a token with expert
  b in layer L+1 (inter-layer expert affinity, ExFlow) and predicts from the current layer's choice.
  It works where the router cannot see the routing (replayed or synthetic traces).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

import torch

if TYPE_CHECKING:  # layers.moe imports this package
    from mixserve.layers.moe import Router


class ExpertPredictor(Protocol):
    """Predicts the next MoE layer's experts from the current layer's input and routing."""

    def predict(self, layer_idx: int, x: torch.Tensor, topk_ids: torch.Tensor) -> tuple[int, list[int]] | None:
        """After layer `layer_idx` routed `x` `[num_tokens, hidden_size]` to `topk_ids`
        `[num_tokens, top_k]`: (next MoE layer, ranked expert ids), or None after the last layer."""
        ...


def _ranked_union(scores: torch.Tensor, top_m: int) -> list[int]:
    """`[num_tokens, num_experts]` scores -> union of per-token top-m, by summed score (descending)."""
    top_m = min(top_m, scores.shape[1])
    chosen = torch.zeros(scores.shape[1], dtype=torch.bool)
    chosen[torch.topk(scores, top_m, dim=1).indices.flatten()] = True
    total = torch.where(chosen, scores.sum(dim=0), torch.tensor(float("-inf")))
    order = torch.argsort(total, descending=True, stable=True)
    return order[:int(chosen.sum())].tolist()


def _next_layers(layer_ids: list[int]) -> dict[int, int]:
    ordered = sorted(layer_ids)
    return dict(zip(ordered, ordered[1:]))


class RouterLookahead:
    """Layer L+1's router applied to layer L's hidden state (see the module docstring)."""

    def __init__(self, routers: dict[int, Router], top_m: int) -> None:
        """`routers`: each MoE layer's own `Router` (the live module, so later dtype changes follow)."""
        if top_m < 1:
            raise ValueError(f"prefetch top_m must be >= 1, got {top_m}")
        self.routers = routers
        self.top_m = top_m
        self.next = _next_layers(list(routers))

    def predict(self, layer_idx: int, x: torch.Tensor, topk_ids: torch.Tensor) -> tuple[int, list[int]] | None:
        nxt = self.next.get(layer_idx)
        if nxt is None:
            return None
        # Ranked by the next router's full score distribution, summed over tokens: its top-k alone
        # (`route`) would drop the mass of experts a token ranks below its top-k.
        return nxt, _ranked_union(self.routers[nxt].scores(x), self.top_m)  # scores: [num_tokens, num_experts]


class AffinityPredictor:
    """Online co-occurrence counts between consecutive MoE layers (see the module docstring)."""

    def __init__(self, layer_ids: list[int], num_experts: int, top_m: int, prior: float = 1e-3) -> None:
        if top_m < 1:
            raise ValueError(f"prefetch top_m must be >= 1, got {top_m}")
        self.top_m = top_m
        self.next = _next_layers(layer_ids)
        self.prev = {b: a for a, b in self.next.items()}
        # counts[L][a, b]: tokens that used expert a in prev(L) and expert b in L.
        self.counts = {layer_idx: torch.full((num_experts, num_experts), prior) for layer_idx in self.prev}
        self.popular = {layer_idx: torch.zeros(num_experts) for layer_idx in layer_ids}
        self._last: tuple[int, torch.Tensor] | None = None

    def _learn(self, layer_idx: int, topk_ids: torch.Tensor) -> None:
        self.popular[layer_idx] += torch.bincount(topk_ids.flatten(), minlength=len(self.popular[layer_idx]))
        last = self._last
        if last is None or last[0] != self.prev.get(layer_idx) or last[1].shape[0] != topk_ids.shape[0]:
            return
        counts = self.counts[layer_idx]
        a = last[1][:, :, None].expand(-1, -1, topk_ids.shape[1]).flatten()
        b = topk_ids[:, None, :].expand(-1, last[1].shape[1], -1).flatten()
        counts.index_put_((a, b), torch.ones(len(a)), accumulate=True)

    def predict(self, layer_idx: int, x: torch.Tensor, topk_ids: torch.Tensor) -> tuple[int, list[int]] | None:
        self._learn(layer_idx, topk_ids)
        self._last = (layer_idx, topk_ids)
        nxt = self.next.get(layer_idx)
        if nxt is None:
            return None
        counts = self.counts[nxt]
        rows = counts / counts.sum(dim=1, keepdim=True)  # P(b in next | a here)
        scores = rows[topk_ids].sum(dim=1)  # [num_tokens, num_experts]
        popular = self.popular[nxt]
        scores = scores + 1e-3 * popular / popular.sum().clamp(min=1.0)  # break ties by popularity
        return nxt, _ranked_union(scores, self.top_m)
