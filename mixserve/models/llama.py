"""Llama (and Mistral): pre-norm decoder, GQA attention with RoPE, SwiGLU MLP.

Mistral is Llama plus a sliding window on every layer, so `MistralForCausalLM` maps here too.
q/k/v are one fused `qkv_proj` and gate/up one `gate_up_proj`; `load_weights` slices the HF tensors
into their rows.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mixserve.layers.attention import Attention, AttentionMetadata, KVCache
from mixserve.layers.linear import Linear
from mixserve.layers.norm import RMSNorm
from mixserve.layers.rotary import RotaryEmbedding
from mixserve.models.decoder import DecoderLM
from mixserve.models.hf_config import attention_shape, require, require_silu, rope
from mixserve.models.weights import dense_splits, load_dense_weights

CosSin = tuple[torch.Tensor, torch.Tensor]


@dataclass(frozen=True)
class LlamaArgs:
    """The part of an HF Llama/Mistral config.json this module reads."""

    vocab_size: int
    """Rows of the embedding and the LM head."""
    hidden_size: int
    """Width of the residual stream."""
    intermediate_size: int
    """Width of the SwiGLU MLP."""
    num_hidden_layers: int
    """Decoder blocks."""
    num_attention_heads: int
    """Query heads."""
    num_key_value_heads: int
    """KV heads (GQA); defaults to `num_attention_heads`."""
    head_dim: int
    """Channels per head; defaults to `hidden_size // num_attention_heads`."""
    rms_norm_eps: float
    """Epsilon of every RMSNorm."""
    rope_theta: float
    """RoPE base."""
    rope_scaling: dict[str, Any] | None
    """RoPE scaling parameters (`rope_type` default/linear/llama3), or None for plain RoPE."""
    attention_bias: bool
    """Bias on q/k/v/o projections."""
    mlp_bias: bool
    """Bias on gate/up/down projections."""
    tie_word_embeddings: bool
    """The LM head shares the embedding matrix."""
    sliding_window: int | None
    """Mistral's attention window on every layer; None for full attention (always None for Llama)."""

    @staticmethod
    def from_hf(cfg: dict[str, Any]) -> LlamaArgs:
        hidden_size, num_heads, num_kv_heads, head_dim = attention_shape(cfg, "llama")
        require_silu(cfg, "llama")
        theta, scaling = rope(cfg, 10000.0)
        archs = cfg.get("architectures") or []
        is_mistral = cfg.get("model_type") == "mistral" or "MistralForCausalLM" in archs
        return LlamaArgs(
            vocab_size=int(require(cfg, "vocab_size", "llama")),
            hidden_size=hidden_size,
            intermediate_size=int(require(cfg, "intermediate_size", "llama")),
            num_hidden_layers=int(require(cfg, "num_hidden_layers", "llama")),
            num_attention_heads=num_heads,
            num_key_value_heads=num_kv_heads,
            head_dim=head_dim,
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            rope_theta=theta,
            rope_scaling=scaling,
            attention_bias=bool(cfg.get("attention_bias", False)),
            mlp_bias=bool(cfg.get("mlp_bias", False)),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            sliding_window=cfg.get("sliding_window") if is_mistral else None,
        )


class LlamaAttention(nn.Module):
    def __init__(self, args: LlamaArgs, rotary: RotaryEmbedding) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = (
            args.num_attention_heads, args.num_key_value_heads, args.head_dim)
        q_size = self.num_heads * self.head_dim
        kv_size = self.num_kv_heads * self.head_dim
        self.qkv_proj = Linear(args.hidden_size, q_size + 2 * kv_size, bias=args.attention_bias)
        self.o_proj = Linear(q_size, args.hidden_size, bias=args.attention_bias)
        self.rotary = rotary  # shared by every layer; holds no weights
        self.attn = Attention(self.num_heads, self.num_kv_heads, self.head_dim, self.head_dim**-0.5,
                              sliding_window=args.sliding_window)

    def forward(self, x: torch.Tensor, cos_sin: CosSin, kv_cache: KVCache,
                meta: AttentionMetadata) -> torch.Tensor:
        qkv = self.qkv_proj(x).view(-1, self.num_heads + 2 * self.num_kv_heads, self.head_dim)
        num_qk = self.num_heads + self.num_kv_heads
        qk = self.rotary.rotate(qkv[:, :num_qk], cos_sin)  # q and k heads rotated in one pass
        # q: [num_tokens, num_heads, head_dim]; k, v: [num_tokens, num_kv_heads, head_dim]
        q, k = qk.split([self.num_heads, self.num_kv_heads], dim=1)
        return self.o_proj(self.attn(q, k, qkv[:, num_qk:], kv_cache, meta))


class LlamaMLP(nn.Module):
    def __init__(self, args: LlamaArgs) -> None:
        super().__init__()
        self.intermediate_size = args.intermediate_size
        self.gate_up_proj = Linear(args.hidden_size, 2 * args.intermediate_size, bias=args.mlp_bias)
        self.down_proj = Linear(args.intermediate_size, args.hidden_size, bias=args.mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).split(self.intermediate_size, dim=-1)
        return self.down_proj(F.silu(gate) * up)  # [num_tokens, hidden_size]


class LlamaBlock(nn.Module):
    def __init__(self, args: LlamaArgs, rotary: RotaryEmbedding) -> None:
        super().__init__()
        self.self_attn = LlamaAttention(args, rotary)
        self.mlp = LlamaMLP(args)
        self.input_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)

    def forward(self, x: torch.Tensor, cos_sin: CosSin, kv_cache: KVCache,
                meta: AttentionMetadata) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos_sin, kv_cache, meta)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaModel(nn.Module):
    def __init__(self, args: LlamaArgs) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size,
                                         _weight=torch.empty(args.vocab_size, args.hidden_size), _freeze=True)
        self.rotary = RotaryEmbedding(args.head_dim, args.rope_theta, scaling=args.rope_scaling)
        self.layers = nn.ModuleList(LlamaBlock(args, self.rotary) for _ in range(args.num_hidden_layers))
        self.norm = RMSNorm(args.hidden_size, args.rms_norm_eps)


class LlamaForCausalLM(DecoderLM):
    """Llama/Mistral over the paged KV cache (the `CausalLM` contract of `models/base.py`)."""

    def __init__(self, hf_config: dict[str, Any]) -> None:
        args = LlamaArgs.from_hf(hf_config)
        super().__init__(args, LlamaModel(args))

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy HF tensors in; q/k/v and gate/up land in row ranges of the fused projections."""
        a = self.args
        load_dense_weights(self, weights, dense_splits(a.num_attention_heads, a.num_key_value_heads, a.head_dim,
                                                       a.intermediate_size), a.tie_word_embeddings)
