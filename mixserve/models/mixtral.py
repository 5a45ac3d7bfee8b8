"""Mixtral: Llama/Mistral attention (GQA, RoPE, optional sliding window) with a sparse MoE in every layer.

Routing: softmax over all experts in float32, top-k, renormalise the k weights, scale expert outputs
in float32. Expert weights live in the model's `ExpertProvider` (all resident by default), not in the
blocks. They load from per-expert names `block_sparse_moe.experts.{e}.w1/w3/w2.weight` (gate/up/down;
what `save_pretrained` and hub checkpoints hold) or from 3-D all-expert tensors
`mlp.experts.{gate_up_proj,gate_proj,up_proj,down_proj}` `[num_experts, ...]` (HF 5.x in-memory layout;
a GGUF `*_exps` tensor maps here too).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from mixserve.experts.provider import ExpertProvider
from mixserve.experts.trace import RoutingObserver
from mixserve.layers.attention import Attention, AttentionMetadata, KVCache
from mixserve.layers.expert_slot import ExpertNames, ExpertSlot, load_moe_weights, moe_splits
from mixserve.layers.linear import Linear
from mixserve.layers.moe import MoE
from mixserve.layers.norm import RMSNorm
from mixserve.layers.rotary import RotaryEmbedding
from mixserve.models.decoder import MoEDecoderLM
from mixserve.models.hf_config import attention_shape, num_experts, require, require_silu, rope

CosSin = tuple[torch.Tensor, torch.Tensor]


@dataclass(frozen=True)
class MixtralArgs:
    """The part of an HF Mixtral config.json this module reads."""

    vocab_size: int
    """Rows of the embedding and the LM head."""
    hidden_size: int
    """Width of the residual stream."""
    intermediate_size: int
    """Width of each expert's SwiGLU MLP."""
    num_hidden_layers: int
    """Decoder blocks (every one has an MoE)."""
    num_attention_heads: int
    """Query heads."""
    num_key_value_heads: int
    """KV heads (GQA); defaults to `num_attention_heads`."""
    head_dim: int
    """Channels per head; defaults to `hidden_size // num_attention_heads`."""
    num_experts: int
    """Experts per MoE layer (`num_local_experts`)."""
    top_k: int
    """Experts each token uses (`num_experts_per_tok`)."""
    rms_norm_eps: float
    """Epsilon of every RMSNorm."""
    rope_theta: float
    """RoPE base."""
    rope_scaling: dict[str, Any] | None
    """RoPE parameters (`rope_type` default/linear/llama3), or None for plain RoPE."""
    tie_word_embeddings: bool
    """The LM head shares the embedding matrix."""
    sliding_window: int | None
    """Attention window on every layer; None for full attention."""

    def __post_init__(self) -> None:
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"mixtral: num_attention_heads={self.num_attention_heads} is not a multiple "
                             f"of num_key_value_heads={self.num_key_value_heads}")
        if not 1 <= self.top_k <= self.num_experts:
            raise ValueError(f"mixtral: num_experts_per_tok={self.top_k} not in [1, {self.num_experts}]")

    @staticmethod
    def from_hf(cfg: dict[str, Any]) -> MixtralArgs:
        hidden_size, num_heads, num_kv_heads, head_dim = attention_shape(cfg, "mixtral")
        require_silu(cfg, "mixtral")
        experts = num_experts(cfg, "mixtral", "num_local_experts", "num_experts")
        theta, scaling = rope(cfg, 1e6)
        return MixtralArgs(
            vocab_size=int(require(cfg, "vocab_size", "mixtral")),
            hidden_size=hidden_size,
            intermediate_size=int(require(cfg, "intermediate_size", "mixtral")),
            num_hidden_layers=int(require(cfg, "num_hidden_layers", "mixtral")),
            num_attention_heads=num_heads,
            num_key_value_heads=num_kv_heads,
            head_dim=head_dim,
            num_experts=experts,
            top_k=int(require(cfg, "num_experts_per_tok", "mixtral")),
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-5)),
            rope_theta=theta,
            rope_scaling=scaling,
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            sliding_window=cfg.get("sliding_window"),
        )


class MixtralAttention(nn.Module):
    def __init__(self, args: MixtralArgs, rotary: RotaryEmbedding) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = (
            args.num_attention_heads, args.num_key_value_heads, args.head_dim)
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        self.qkv_proj = Linear(args.hidden_size, self.q_size + 2 * self.kv_size)
        self.o_proj = Linear(self.q_size, args.hidden_size)
        self.rotary = rotary  # shared by every layer; holds no weights
        self.attn = Attention(self.num_heads, self.num_kv_heads, self.head_dim, self.head_dim**-0.5,
                              sliding_window=args.sliding_window)

    def forward(self, x: torch.Tensor, cos_sin: CosSin, kv_cache: KVCache,
                meta: AttentionMetadata) -> torch.Tensor:
        qkv = self.qkv_proj(x)  # [num_tokens, (num_heads + 2 * num_kv_heads) * head_dim]
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(-1, self.num_heads, self.head_dim)  # [num_tokens, num_heads, head_dim]
        k = k.view(-1, self.num_kv_heads, self.head_dim)  # [num_tokens, num_kv_heads, head_dim]
        v = v.view(-1, self.num_kv_heads, self.head_dim)
        q, k = self.rotary(q, k, cos_sin)
        return self.o_proj(self.attn(q, k, v, kv_cache, meta))


class MixtralBlock(nn.Module):
    def __init__(self, args: MixtralArgs, layer_idx: int, rotary: RotaryEmbedding) -> None:
        super().__init__()
        self.self_attn = MixtralAttention(args, rotary)
        self.block_sparse_moe = MoE(layer_idx, args.hidden_size, args.intermediate_size, args.num_experts,
                                    args.top_k, normalize_topk=True, weights_in_activation_dtype=False)
        self.input_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)

    def forward(self, x: torch.Tensor, cos_sin: CosSin, kv_cache: KVCache, meta: AttentionMetadata,
                experts: ExpertProvider, observer: RoutingObserver | None) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos_sin, kv_cache, meta)
        return x + self.block_sparse_moe(self.post_attention_layernorm(x), experts, observer)


class MixtralModel(nn.Module):
    def __init__(self, args: MixtralArgs) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size,
                                         _weight=torch.empty(args.vocab_size, args.hidden_size), _freeze=True)
        self.rotary = RotaryEmbedding(args.head_dim, args.rope_theta, scaling=args.rope_scaling)
        self.layers = nn.ModuleList(MixtralBlock(args, i, self.rotary)
                                    for i in range(args.num_hidden_layers))
        self.norm = RMSNorm(args.hidden_size, args.rms_norm_eps)


EXPERT_NAMES = ExpertNames("block_sparse_moe", "w1", "w3", "w2", aliases=("mlp",))
"""Where this family's checkpoints keep expert tensors (also the GGUF expert names)."""


class MixtralForCausalLM(MoEDecoderLM):
    """Mixtral over the paged KV cache (the `CausalLM` contract of `models/base.py`)."""

    def __init__(self, hf_config: dict[str, Any]) -> None:
        args = MixtralArgs.from_hf(hf_config)
        slot = ExpertSlot(list(range(args.num_hidden_layers)), args.num_experts, args.hidden_size,
                          args.intermediate_size)
        super().__init__(args, MixtralModel(args), slot)

    expert_key = staticmethod(EXPERT_NAMES.key)
    """Where HF tensor `name` goes among the expert weights; None if it is not an expert tensor."""

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy HF tensors in: experts into the in-memory provider (the checkpoint must hold none once a
        provider is set), q/k/v and gate/up into the fused rows."""
        args = self.args
        q, kv = args.num_attention_heads * args.head_dim, args.num_key_value_heads * args.head_dim
        # HF 5.x in-memory names call the MoE block `mlp`; checkpoints say `block_sparse_moe`.
        load_moe_weights({"model": self.model, "lm_head": self.lm_head}, moe_splits(q, kv), weights,
                         self.expert_slot.loader, EXPERT_NAMES, tied=args.tie_word_embeddings,
                         rename=lambda name: name.replace(".mlp.gate.", ".block_sparse_moe.gate."))
