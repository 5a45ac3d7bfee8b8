"""The seam between MoE layers and wherever expert weights live.

An MoE layer routes its tokens first, then tells its `ExpertProvider` the routing in ONE
`plan(layer_idx, x, topk_ids, active_ids)` call, which returns the waves to run: lists of expert ids
partitioning the active set (all-resident providers: one wave). Per wave the layer calls
`get(layer_idx, wave)`, computes, and calls `release`. So a budgeted cache sees the whole active set
(and the hidden state, for predicting the next layer) before any matmul runs: it can load all misses
in one go, split a prefill's experts into waves that fit, and it must keep the returned tensors valid
(pinned) until `release`. Prediction and prefetch for later layers are the provider's own business.

Expert `e` of a layer is a SiLU-gated MLP stored as two matrices:
  gate_up `[2 * intermediate_size, hidden_size]` (gate rows first, then up rows), and
  down `[hidden_size, intermediate_size]`.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from enum import Enum
from typing import Protocol

import torch
from torch import nn

from mixserve.models.base import WeightError


@dataclass(frozen=True)
class ExpertWeights:
    """The weights of the experts one MoE call uses; valid until handed back with `release`."""

    layer_idx: int
    """The MoE layer these experts belong to."""
    expert_ids: list[int]
    """Expert ids, in the order the caller asked for them."""
    gate_up: list[torch.Tensor]
    """`[2 * intermediate_size, hidden_size]` per expert, aligned with `expert_ids`."""
    down: list[torch.Tensor]
    """`[hidden_size, intermediate_size]` per expert, aligned with `expert_ids`."""


class ExpertProvider(Protocol):
    """Where MoE layers get expert weights from (all resident, or a budgeted cache)."""

    def plan(self, layer_idx: int, x: torch.Tensor, topk_ids: torch.Tensor,
             active_ids: list[int]) -> list[list[int]]:
        """Layer `layer_idx` routed `x` `[num_tokens, hidden_size]` to `topk_ids` `[num_tokens, top_k]`,
        using the ascending `active_ids`: the waves (a partition of `active_ids`) to `get` one by one."""
        ...

    def get(self, layer_idx: int, expert_ids: list[int]) -> ExpertWeights:
        """Weights of `expert_ids` (the full active set of one layer for one step)."""
        ...

    def release(self, weights: ExpertWeights) -> None:
        """The caller is done with `weights`; a cache may evict them from now on."""
        ...


@contextmanager
def borrow_experts(provider: ExpertProvider, layer_idx: int,
                   expert_ids: list[int]) -> Iterator[ExpertWeights]:
    """`get` on entry, `release` on exit (also when the body raises)."""
    weights = provider.get(layer_idx, expert_ids)
    try:
        yield weights
    finally:
        provider.release(weights)


class ExpertProj(Enum):
    """Which matrix a checkpoint tensor fills."""

    GATE = "gate"
    """`[intermediate_size, hidden_size]`: first half of gate_up (HF gate_proj / Mixtral w1)."""
    UP = "up"
    """`[intermediate_size, hidden_size]`: second half of gate_up (HF up_proj / Mixtral w3)."""
    GATE_UP = "gate_up"
    """`[2 * intermediate_size, hidden_size]`: both halves at once."""
    DOWN = "down"
    """`[hidden_size, intermediate_size]` (HF down_proj / Mixtral w2)."""


@dataclass(frozen=True)
class ExpertKey:
    """Where one checkpoint tensor goes in the expert weights (families map HF names to these)."""

    layer_idx: int
    """Decoder layer."""
    expert_id: int | None
    """Expert, or None for a fused 3-D tensor with a leading `num_experts` dim (HF 5.x in-memory layout)."""
    proj: ExpertProj
    """Which matrix (or half of gate_up) it fills."""


class InMemoryExpertProvider(nn.Module):
    """All experts resident: per MoE layer, stacked `[num_experts, 2 * intermediate_size, hidden_size]`
    gate_up and `[num_experts, hidden_size, intermediate_size]` down parameters.

    `get` returns views into the stacks (zero copy); `release` does nothing. It is an `nn.Module`, so
    `model.to(dtype)` converts it and its bytes count in `model.parameters()`.
    """

    def __init__(self, layer_ids: list[int], num_experts: int, hidden_size: int,
                 intermediate_size: int) -> None:
        super().__init__()
        self.layer_ids = list(layer_ids)
        self.num_experts = num_experts
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self._slot = {layer_idx: i for i, layer_idx in enumerate(self.layer_ids)}
        shape_gu = (num_experts, 2 * intermediate_size, hidden_size)
        shape_down = (num_experts, hidden_size, intermediate_size)
        self.gate_up = nn.ParameterList(
            [nn.Parameter(torch.empty(shape_gu), requires_grad=False) for _ in self.layer_ids])
        self.down = nn.ParameterList(
            [nn.Parameter(torch.empty(shape_down), requires_grad=False) for _ in self.layer_ids])
        self._loaded: set[tuple[int, int, ExpertProj]] = set()

    def stacks(self, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(gate_up, down) stacks of one layer."""
        if layer_idx not in self._slot:
            raise KeyError(f"layer {layer_idx} has no experts (MoE layers: {self.layer_ids})")
        slot = self._slot[layer_idx]
        return self.gate_up[slot], self.down[slot]

    def plan(self, layer_idx: int, x: torch.Tensor, topk_ids: torch.Tensor,
             active_ids: list[int]) -> list[list[int]]:
        return [list(active_ids)]

    def get(self, layer_idx: int, expert_ids: list[int]) -> ExpertWeights:
        gate_up, down = self.stacks(layer_idx)
        for e in expert_ids:
            if not 0 <= e < self.num_experts:
                raise IndexError(f"expert {e} out of range for {self.num_experts} experts")
        return ExpertWeights(layer_idx, list(expert_ids), [gate_up[e] for e in expert_ids],
                             [down[e] for e in expert_ids])

    def release(self, weights: ExpertWeights) -> None:
        pass

    # ---- loading -------------------------------------------------------------------------------------

    def load(self, key: ExpertKey, tensor: torch.Tensor, name: str) -> None:
        """Copy checkpoint tensor `name` into one expert (or into all of a layer's experts, when
        `key.expert_id` is None); raises WeightError naming `name` on any mismatch."""
        layer_idx, expert_id, proj = key.layer_idx, key.expert_id, key.proj
        if layer_idx not in self._slot:
            raise WeightError(f"unexpected tensor {name!r}: layer {layer_idx} is not an MoE layer")
        inter, hidden = self.intermediate_size, self.hidden_size
        gate_up, down = self.stacks(layer_idx)
        rows = {ExpertProj.GATE: (gate_up, 0, inter), ExpertProj.UP: (gate_up, inter, inter),
                ExpertProj.GATE_UP: (gate_up, 0, 2 * inter), ExpertProj.DOWN: (down, 0, hidden)}
        target, start, num_rows = rows[proj]
        if expert_id is not None and not 0 <= expert_id < self.num_experts:
            raise WeightError(f"unexpected tensor {name!r}: expert {expert_id} >= num_experts "
                              f"{self.num_experts}")
        if expert_id is None:
            dst, expert_ids = target[:, start:start + num_rows], list(range(self.num_experts))
        else:
            dst, expert_ids = target[expert_id, start:start + num_rows], [expert_id]
        if tuple(tensor.shape) != tuple(dst.shape):
            raise WeightError(f"tensor {name!r} has shape {tuple(tensor.shape)}, expected {tuple(dst.shape)}")
        parts = [ExpertProj.GATE, ExpertProj.UP] if proj is ExpertProj.GATE_UP else [proj]
        slots = {(layer_idx, e, p) for e in expert_ids for p in parts}
        if slots & self._loaded:
            raise WeightError(f"checkpoint tensor {name!r} fills expert weights already loaded")
        with torch.no_grad():
            dst.copy_(tensor)
        self._loaded |= slots

    def begin_loading(self) -> None:
        """Forget what earlier `load` calls filled (a fresh `load_weights` pass starts)."""
        self._loaded.clear()

    def missing(self) -> list[tuple[int, int, ExpertProj]]:
        """(layer_idx, expert_id, GATE/UP/DOWN) not yet filled by `load`, in order."""
        return [(layer_idx, e, p) for layer_idx in self.layer_ids for e in range(self.num_experts)
                for p in (ExpertProj.GATE, ExpertProj.UP, ExpertProj.DOWN)
                if (layer_idx, e, p) not in self._loaded]


def load_expert(store: InMemoryExpertProvider | None, key: ExpertKey, tensor: torch.Tensor, name: str) -> None:
    """`store.load`, or WeightError when the model's experts come from an expert store instead."""
    if store is None:
        raise WeightError(f"unexpected expert tensor {name!r}: this model's experts come from its expert "
                          f"store, not the checkpoint")
    store.load(key, tensor, name)
