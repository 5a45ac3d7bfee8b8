"""The engine plumbing every MoE family shares: where its experts live, how they load, who watches routing.

- `ExpertNames`: how one family names expert tensors in HF checkpoints (Mixtral `w1/w3/w2` under
  `block_sparse_moe`, the others `gate_proj/up_proj/down_proj` under `mlp`); the GGUF name table
  reads the same object, so a family states its names once.
- `ExpertSlot`: the model's experts by explicit composition. `provider` is what every MoE layer borrows
  from; `loader` is the in-memory provider `load_weights` fills from the checkpoint, or None once a
  provider was set from outside (a budgeted store, or experts already decoded from a pack): then an
  expert tensor in the checkpoint is an error. `observer` sees every routing decision.
- `load_moe_weights`: one checkpoint pass, experts to `loader`, everything else into the fused targets.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import cached_property

import torch
from torch import nn

from mixserve.experts.provider import (
    ExpertKey,
    ExpertProj,
    ExpertProvider,
    InMemoryExpertProvider,
    load_expert,
)
from mixserve.experts.trace import RoutingObserver
from mixserve.models.base import WeightError
from mixserve.models.weights import Splits, copy_into, fused_targets

_FUSED_PROJ = {"gate_proj": ExpertProj.GATE, "up_proj": ExpertProj.UP, "down_proj": ExpertProj.DOWN,
               "gate_up_proj": ExpertProj.GATE_UP}


@dataclass(frozen=True)
class ExpertNames:
    """How one family names its expert tensors in HF checkpoints.

    Per-expert tensors are `model.layers.{L}.{block}.experts.{e}.{leaf}.weight`; 3-D all-expert tensors
    (HF 5.x in-memory layout; a GGUF `*_exps` tensor maps there too) are
    `model.layers.{L}.{block}.experts.{gate_up_proj,gate_proj,up_proj,down_proj}`.
    """

    block: str
    """Module name of the MoE block in checkpoints (`mlp`; Mixtral `block_sparse_moe`)."""
    gate: str
    """Leaf name of one expert's gate matrix (`gate_proj`; Mixtral `w1`)."""
    up: str
    """Leaf name of one expert's up matrix (`up_proj`; Mixtral `w3`)."""
    down: str
    """Leaf name of one expert's down matrix (`down_proj`; Mixtral `w2`)."""
    aliases: tuple[str, ...] = ()
    """Other block names accepted when loading (Mixtral: HF 5.x in-memory names say `mlp`)."""

    @cached_property
    def _patterns(self) -> tuple[re.Pattern[str], re.Pattern[str]]:
        blocks = "|".join(re.escape(b) for b in (self.block, *self.aliases))
        leaves = "|".join(re.escape(leaf) for leaf in (self.gate, self.up, self.down))
        return (re.compile(rf"model\.layers\.(\d+)\.(?:{blocks})\.experts\.(\d+)\.({leaves})\.weight"),
                re.compile(rf"model\.layers\.(\d+)\.(?:{blocks})\.experts\."
                           rf"(gate_up_proj|gate_proj|up_proj|down_proj)"))

    def leaf(self, proj: ExpertProj) -> str:
        """The per-expert leaf name of GATE, UP or DOWN."""
        return {ExpertProj.GATE: self.gate, ExpertProj.UP: self.up, ExpertProj.DOWN: self.down}[proj]

    def key(self, name: str) -> ExpertKey | None:
        """Where HF tensor `name` goes among the expert weights; None if it is not an expert tensor."""
        per_expert, fused = self._patterns
        if m := per_expert.fullmatch(name):
            proj = {self.gate: ExpertProj.GATE, self.up: ExpertProj.UP, self.down: ExpertProj.DOWN}[m[3]]
            return ExpertKey(int(m[1]), int(m[2]), proj)
        if m := fused.fullmatch(name):
            return ExpertKey(int(m[1]), None, _FUSED_PROJ[m[2]])
        return None

    def hf_name(self, layer_idx: int, expert_id: int, proj: ExpertProj) -> str:
        """The per-expert checkpoint name of one matrix (GATE, UP or DOWN)."""
        return f"model.layers.{layer_idx}.{self.block}.experts.{expert_id}.{self.leaf(proj)}.weight"


class ExpertSlot(nn.Module):
    """An MoE model's experts: the provider its layers borrow from, what `load_weights` fills, and the
    routing observer (see the module docstring).

    The all-resident provider built here is a registered submodule (`model.to(dtype)` converts it, its
    bytes count in `model.parameters()`) until `set_provider`. A provider set from outside is held, not
    registered: it owns its memory, so it neither follows `model.to()` nor counts as a parameter.
    """

    _external: ExpertProvider | None

    def __init__(self, layer_ids: list[int], num_experts: int, hidden_size: int,
                 intermediate_size: int) -> None:
        super().__init__()
        self.resident: InMemoryExpertProvider | None = InMemoryExpertProvider(
            layer_ids, num_experts, hidden_size, intermediate_size)
        object.__setattr__(self, "_external", None)  # bypasses nn.Module registration (see above)
        self.observer: RoutingObserver | None = None

    @property
    def provider(self) -> ExpertProvider:
        """What every MoE layer borrows expert weights from."""
        if self._external is not None:
            return self._external
        assert self.resident is not None  # set_provider always leaves an external provider
        return self.resident

    @property
    def loader(self) -> InMemoryExpertProvider | None:
        """The provider `load_weights` fills from checkpoint tensors; None once experts come from elsewhere."""
        return self.resident

    def set_provider(self, provider: ExpertProvider) -> None:
        """From now on layers borrow from `provider` and the checkpoint must hold no expert tensors; the
        built-in resident stacks are dropped (pass them back in to keep them, filled from a pack)."""
        self.resident = None
        object.__setattr__(self, "_external", provider)

    def begin_step(self, positions: torch.Tensor, query_lens: list[int]) -> RoutingObserver | None:
        """Tell the observer (if any) a forward pass starts; returns it for the layers."""
        if self.observer is not None:
            self.observer.begin_step(positions, query_lens)
        return self.observer


def moe_splits(q_size: int, kv_size: int) -> Splits:
    """The fused projections of the MoE families: q/k/v rows, and gate/up of dense and shared MLPs."""
    return {"qkv_proj": [("q_proj", q_size), ("k_proj", kv_size), ("v_proj", kv_size)],
            "gate_up_proj": [("gate_proj", None), ("up_proj", None)]}


def load_moe_weights(parts: dict[str, nn.Module], splits: Splits, weights: Iterable[tuple[str, torch.Tensor]],
                     loader: InMemoryExpertProvider | None, names: ExpertNames, *, tied: bool,
                     rename: Callable[[str], str] | None = None) -> None:
    """Copy HF tensors in: experts into `loader`, the rest into the (fused) parameters of `parts`
    (prefix -> module, e.g. `{"model": ..., "lm_head": ...}`); `rename` maps a non-expert name first.
    Raises WeightError naming any unexpected, repeated, mis-shaped or missing tensor."""
    if loader is not None:
        loader.begin_loading()
    targets: dict[str, torch.Tensor] = {}
    for prefix, module in parts.items():
        targets.update(fused_targets(module, splits, prefix))
    if tied:  # the head shares the embedding's tensor; HF checkpoints drop (or ignore) lm_head.weight
        targets.pop("lm_head.weight", None)
    for name, tensor in weights:
        key = names.key(name)
        if key is not None:
            load_expert(loader, key, tensor, name)
        elif not (name.endswith("rotary_emb.inv_freq") or (tied and name == "lm_head.weight")):
            copy_into(targets, rename(name) if rename is not None else name, tensor)
    if targets:
        raise WeightError(f"checkpoint is missing {len(targets)} tensor(s), e.g. {sorted(targets)[:3]}")
    if loader is not None and (missing := loader.missing()):
        layer_idx, e, proj = missing[0]
        raise WeightError(f"checkpoint is missing {len(missing)} expert tensor(s), e.g. "
                          f"{names.hf_name(layer_idx, e, proj)!r}")
