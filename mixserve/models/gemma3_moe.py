"""Gemma3-MoE (`Gemma3MoeForCausalLM`, model_type gemma3_moe_text): mixserve's own layout for a moefied
Gemma3 text model (`mixserve moefy` writes it; see `experts/moefy.py`).

Everything but the MLP is Gemma3 (`gemma3.py`: scaled embedding, `(1 + w)` RMSNorms, four sandwich norms
per block, q/k norms, sliding/full attention with two RoPE tables, optional final softcap). The MLP of
every sparse layer is the shared `layers/moe.py` MoE with GeGLU (tanh-gelu) experts: softmax router,
top-k, renormalised when `norm_topk_prob`, plus an optional always-on shared expert (GeGLU too, not
gated: `shared_expert_intermediate_size` 0 means none). Layers in `mlp_only_layers` (or skipped by
`decoder_sparse_step`) keep the dense Gemma3 MLP. Expert weights live in the model's `ExpertProvider`, so
the budgeted provider (`--expert-memory-budget`, expert packs) works as for every other MoE family.

config.json = the Gemma3 text config plus `num_experts`, `num_experts_per_tok`, `moe_intermediate_size`,
`shared_expert_intermediate_size`, `norm_topk_prob` (and optionally `decoder_sparse_step`,
`mlp_only_layers`). Tensors use HF-style names: `mlp.gate.weight` `[num_experts, hidden]`,
`mlp.experts.{e}.gate_proj/up_proj/down_proj.weight`, `mlp.shared_expert.gate_proj/up_proj/down_proj.weight`.

transformers has no such class: it cannot load this folder. Its correctness is checked instead against
the dense model it came from (moefied with every expert active it is the dense function, tested against
transformers' dense `Gemma3ForCausalLM` within float32 tolerance).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, fields
from typing import Any

import torch
from torch import nn

from mixserve.experts.provider import ExpertProvider
from mixserve.experts.trace import RoutingObserver
from mixserve.layers.attention import AttentionMetadata, KVCache
from mixserve.layers.expert_slot import ExpertNames, ExpertSlot, load_moe_weights, moe_splits
from mixserve.layers.moe import MoE
from mixserve.layers.norm import RMSNorm
from mixserve.layers.rotary import RotaryEmbedding
from mixserve.models.decoder import MoEDecoderLM
from mixserve.models.gemma3 import (
    Gemma3Args,
    Gemma3Attention,
    Gemma3MLP,
    Gemma3Model,
    gemma3_embed,
    gemma3_head,
    gemma3_layers,
)
from mixserve.models.hf_config import num_experts, require, sparse_layer_ids

CosSin = tuple[torch.Tensor, torch.Tensor]
FAMILY = "gemma3_moe"


@dataclass(frozen=True)
class Gemma3MoeArgs(Gemma3Args):
    """The Gemma3 fields (`intermediate_size`: width of the dense MLP of non-sparse layers) plus the MoE ones."""

    moe_intermediate_size: int
    """Width of each routed expert."""
    shared_expert_intermediate_size: int
    """Width of the always-on shared expert of every sparse layer; 0 for none."""
    num_experts: int
    """Routed experts per sparse layer."""
    top_k: int
    """Experts each token uses (`num_experts_per_tok`)."""
    norm_topk_prob: bool
    """Renormalise the top-k weights to sum to 1."""
    moe_layer_ids: tuple[int, ...]
    """Layers with a sparse MoE (from `decoder_sparse_step` and `mlp_only_layers`); the rest are dense."""

    def __post_init__(self) -> None:
        if self.moe_layer_ids and not 1 <= self.top_k <= self.num_experts:
            raise ValueError(f"{FAMILY}: num_experts_per_tok={self.top_k} not in [1, num_experts={self.num_experts}]")
        if self.moe_intermediate_size < 1 or self.shared_expert_intermediate_size < 0:
            raise ValueError(f"{FAMILY}: moe_intermediate_size={self.moe_intermediate_size} must be >= 1 and "
                             f"shared_expert_intermediate_size={self.shared_expert_intermediate_size} >= 0")

    @staticmethod
    def from_hf(cfg: dict[str, Any]) -> Gemma3MoeArgs:
        base = Gemma3Args.from_hf(cfg)
        num_layers = base.num_hidden_layers
        experts = num_experts(cfg, FAMILY, "num_experts", "num_local_experts")
        return Gemma3MoeArgs(
            **{f.name: getattr(base, f.name) for f in fields(Gemma3Args)},
            moe_intermediate_size=int(require(cfg, "moe_intermediate_size", FAMILY)),
            shared_expert_intermediate_size=int(cfg.get("shared_expert_intermediate_size") or 0),
            num_experts=experts,
            top_k=int(require(cfg, "num_experts_per_tok", FAMILY)),
            norm_topk_prob=bool(cfg.get("norm_topk_prob", True)),
            moe_layer_ids=sparse_layer_ids(cfg, num_layers, experts),
        )


class Gemma3MoeBlock(nn.Module):
    """A Gemma3 block (four sandwich norms) whose MLP is a GeGLU MoE (or the dense Gemma3 MLP)."""

    def __init__(self, args: Gemma3MoeArgs, layer_idx: int, rotary: RotaryEmbedding,
                 sliding_window: int | None) -> None:
        super().__init__()
        self.self_attn = Gemma3Attention(args, rotary, sliding_window)
        self.mlp: MoE | Gemma3MLP
        if layer_idx in args.moe_layer_ids:
            shared = args.shared_expert_intermediate_size
            self.mlp = MoE(layer_idx, args.hidden_size, args.moe_intermediate_size, args.num_experts, args.top_k,
                           normalize_topk=args.norm_topk_prob, weights_in_activation_dtype=True,
                           shared_intermediate_size=shared or None, activation="gelu_tanh")
        else:
            self.mlp = Gemma3MLP(args)
        norm = lambda: RMSNorm(args.hidden_size, args.rms_norm_eps, offset=1.0)
        self.input_layernorm, self.post_attention_layernorm = norm(), norm()
        self.pre_feedforward_layernorm, self.post_feedforward_layernorm = norm(), norm()

    def forward(self, x: torch.Tensor, cos_sin: CosSin, kv_cache: KVCache, meta: AttentionMetadata,
                experts: ExpertProvider, observer: RoutingObserver | None) -> torch.Tensor:
        attn = self.self_attn(self.input_layernorm(x), cos_sin, kv_cache, meta)
        x = x + self.post_attention_layernorm(attn)
        h = self.pre_feedforward_layernorm(x)
        h = self.mlp(h, experts, observer) if isinstance(self.mlp, MoE) else self.mlp(h)
        return x + self.post_feedforward_layernorm(h)


EXPERT_NAMES = ExpertNames("mlp", "gate_proj", "up_proj", "down_proj")
"""Where this family's checkpoints keep expert tensors."""


class Gemma3MoeForCausalLM(MoEDecoderLM):
    """Gemma3-MoE over the paged KV cache (the `CausalLM` contract of `models/base.py`)."""

    def __init__(self, hf_config: dict[str, Any]) -> None:
        args = Gemma3MoeArgs.from_hf(hf_config)
        slot = ExpertSlot(list(args.moe_layer_ids), args.num_experts, args.hidden_size, args.moe_intermediate_size)
        trunk = Gemma3Model(args, lambda i, rotary, window: Gemma3MoeBlock(args, i, rotary, window))
        super().__init__(args, trunk, slot)

    expert_key = staticmethod(EXPERT_NAMES.key)
    """Where HF tensor `name` goes among the expert weights; None if it is not an expert tensor."""

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return gemma3_embed(self.model, input_ids)

    def forward_layers(self, hidden: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
                       kv_caches: list[KVCache], start: int, end: int) -> torch.Tensor:
        return gemma3_layers(self.model, self.args, hidden, positions, meta, kv_caches, start, end,
                             *self.block_extras(positions, meta, start))

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        return gemma3_head(self.model, self.lm_head, self.args, hidden)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy HF-named tensors in: experts into the in-memory provider (the checkpoint must hold none
        once a provider is set), q/k/v and gate/up (dense and shared MLPs) into the fused rows."""
        args = self.args
        q, kv = args.num_attention_heads * args.head_dim, args.num_key_value_heads * args.head_dim
        load_moe_weights({"model": self.model, "lm_head": self.lm_head}, moe_splits(q, kv), weights,
                         self.expert_slot.loader, EXPERT_NAMES, tied=args.tie_word_embeddings)
