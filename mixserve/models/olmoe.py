"""OLMoE: Llama-like attention with RMSNorm over the FULL projected q and k (not per head), optional
clamping of q/k/v to [-clip_qkv, clip_qkv], and a sparse MoE in every layer.

Routing: softmax in float32, top-k, renormalise only if `norm_topk_prob`, round the weights to the
activation dtype. Expert weights live in the model's `ExpertProvider` (all resident by default), not
in the blocks. They load from per-expert names `mlp.experts.{e}.gate_proj/up_proj/down_proj.weight`
(what `save_pretrained` and hub checkpoints hold) or from 3-D all-expert tensors
`mlp.experts.{gate_up_proj,gate_proj,up_proj,down_proj}` `[num_experts, ...]` (HF 5.x in-memory
layout; a GGUF `*_exps` tensor maps here too).
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
class OlmoeArgs:
    """The part of an HF OLMoE config.json this module reads."""

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
    """Experts per MoE layer."""
    top_k: int
    """Experts each token uses (`num_experts_per_tok`)."""
    norm_topk_prob: bool
    """Renormalise the top-k weights to sum to 1."""
    attention_bias: bool
    """Bias on the q/k/v/o projections."""
    rms_norm_eps: float
    """Epsilon of every RMSNorm."""
    rope_theta: float
    """RoPE base."""
    rope_scaling: dict[str, Any] | None
    """RoPE parameters (`rope_type` default/linear/llama3), or None for plain RoPE."""
    tie_word_embeddings: bool
    """The LM head shares the embedding matrix."""
    clip_qkv: float | None
    """Clamp q, k and v (after q/k norm) to [-clip_qkv, clip_qkv]; None for no clamping."""

    def __post_init__(self) -> None:
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"olmoe: num_attention_heads={self.num_attention_heads} is not a multiple "
                             f"of num_key_value_heads={self.num_key_value_heads}")
        if not 1 <= self.top_k <= self.num_experts:
            raise ValueError(f"olmoe: num_experts_per_tok={self.top_k} not in [1, {self.num_experts}]")

    @staticmethod
    def from_hf(cfg: dict[str, Any]) -> OlmoeArgs:
        hidden_size, num_heads, num_kv_heads, head_dim = attention_shape(cfg, "olmoe")
        num_layers = int(require(cfg, "num_hidden_layers", "olmoe"))
        require_silu(cfg, "olmoe")
        experts = num_experts(cfg, "olmoe", "num_experts", "num_local_experts")
        theta, scaling = rope(cfg, 10000.0)
        return OlmoeArgs(
            vocab_size=int(require(cfg, "vocab_size", "olmoe")),
            hidden_size=hidden_size,
            intermediate_size=int(require(cfg, "intermediate_size", "olmoe")),
            num_hidden_layers=num_layers,
            num_attention_heads=num_heads,
            num_key_value_heads=num_kv_heads,
            head_dim=head_dim,
            num_experts=experts,
            top_k=int(require(cfg, "num_experts_per_tok", "olmoe")),
            norm_topk_prob=bool(cfg.get("norm_topk_prob", False)),
            attention_bias=bool(cfg.get("attention_bias", False)),
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-5)),
            rope_theta=theta,
            rope_scaling=scaling,
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            clip_qkv=float(cfg["clip_qkv"]) if cfg.get("clip_qkv") is not None else None,
        )


class OlmoeAttention(nn.Module):
    def __init__(self, args: OlmoeArgs, rotary: RotaryEmbedding) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = (
            args.num_attention_heads, args.num_key_value_heads, args.head_dim)
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        self.qkv_proj = Linear(args.hidden_size, self.q_size + 2 * self.kv_size, bias=args.attention_bias)
        self.o_proj = Linear(self.q_size, args.hidden_size, bias=args.attention_bias)
        self.q_norm = RMSNorm(self.q_size, args.rms_norm_eps)  # over all heads at once, unlike Qwen3
        self.k_norm = RMSNorm(self.kv_size, args.rms_norm_eps)
        self.clip_qkv = args.clip_qkv
        self.rotary = rotary  # shared by every layer; holds no weights
        self.attn = Attention(self.num_heads, self.num_kv_heads, self.head_dim, self.head_dim**-0.5)

    def forward(self, x: torch.Tensor, cos_sin: CosSin, kv_cache: KVCache,
                meta: AttentionMetadata) -> torch.Tensor:
        qkv = self.qkv_proj(x)  # [num_tokens, (num_heads + 2 * num_kv_heads) * head_dim]
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q, k = self.q_norm(q), self.k_norm(k)
        if self.clip_qkv is not None:
            q, k, v = (t.clamp(-self.clip_qkv, self.clip_qkv) for t in (q, k, v))
        q = q.view(-1, self.num_heads, self.head_dim)  # [num_tokens, num_heads, head_dim]
        k = k.view(-1, self.num_kv_heads, self.head_dim)  # [num_tokens, num_kv_heads, head_dim]
        v = v.view(-1, self.num_kv_heads, self.head_dim)
        q, k = self.rotary(q, k, cos_sin)
        return self.o_proj(self.attn(q, k, v, kv_cache, meta))


class OlmoeBlock(nn.Module):
    def __init__(self, args: OlmoeArgs, layer_idx: int, rotary: RotaryEmbedding) -> None:
        super().__init__()
        self.self_attn = OlmoeAttention(args, rotary)
        self.mlp = MoE(layer_idx, args.hidden_size, args.intermediate_size, args.num_experts, args.top_k,
                       normalize_topk=args.norm_topk_prob, weights_in_activation_dtype=True)
        self.input_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)

    def forward(self, x: torch.Tensor, cos_sin: CosSin, kv_cache: KVCache, meta: AttentionMetadata,
                experts: ExpertProvider, observer: RoutingObserver | None) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos_sin, kv_cache, meta)
        return x + self.mlp(self.post_attention_layernorm(x), experts, observer)


class OlmoeModel(nn.Module):
    def __init__(self, args: OlmoeArgs) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size,
                                         _weight=torch.empty(args.vocab_size, args.hidden_size), _freeze=True)
        self.rotary = RotaryEmbedding(args.head_dim, args.rope_theta, scaling=args.rope_scaling)
        self.layers = nn.ModuleList(OlmoeBlock(args, i, self.rotary)
                                    for i in range(args.num_hidden_layers))
        self.norm = RMSNorm(args.hidden_size, args.rms_norm_eps)


EXPERT_NAMES = ExpertNames("mlp", "gate_proj", "up_proj", "down_proj")
"""Where this family's checkpoints keep expert tensors (also the GGUF expert names)."""


class OlmoeForCausalLM(MoEDecoderLM):
    """OLMoE over the paged KV cache (the `CausalLM` contract of `models/base.py`)."""

    def __init__(self, hf_config: dict[str, Any]) -> None:
        args = OlmoeArgs.from_hf(hf_config)
        slot = ExpertSlot(list(range(args.num_hidden_layers)), args.num_experts, args.hidden_size,
                          args.intermediate_size)
        super().__init__(args, OlmoeModel(args), slot)

    expert_key = staticmethod(EXPERT_NAMES.key)
    """Where HF tensor `name` goes among the expert weights; None if it is not an expert tensor."""

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy HF tensors in: experts into the in-memory provider (the checkpoint must hold none once a
        provider is set), q/k/v and gate/up into the fused rows."""
        args = self.args
        q, kv = args.num_attention_heads * args.head_dim, args.num_key_value_heads * args.head_dim
        load_moe_weights({"model": self.model, "lm_head": self.lm_head}, moe_splits(q, kv), weights,
                         self.expert_slot.loader, EXPERT_NAMES, tied=args.tie_word_embeddings)
