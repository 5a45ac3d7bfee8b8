"""Qwen2: Llama-shaped decoder with a bias on q/k/v, and optional sliding-window layers.

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
from mixserve.models.hf_config import attention_shape, require, require_silu, rope, window_layers
from mixserve.models.weights import dense_splits, load_dense_weights

CosSin = tuple[torch.Tensor, torch.Tensor]


@dataclass(frozen=True)
class Qwen2Args:
    """The part of an HF Qwen2 config.json this module reads."""

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
    tie_word_embeddings: bool
    """The LM head shares the embedding matrix."""
    sliding_window: int | None
    """Attention window of the sliding layers; None unless `use_sliding_window` is set."""
    sliding_layers: tuple[bool, ...]
    """Per layer: whether it attends through `sliding_window`."""

    @staticmethod
    def from_hf(cfg: dict[str, Any]) -> Qwen2Args:
        hidden_size, num_heads, num_kv_heads, head_dim = attention_shape(cfg, "qwen2")
        num_layers = int(require(cfg, "num_hidden_layers", "qwen2"))
        require_silu(cfg, "qwen2")
        theta, scaling = rope(cfg, 10000.0)
        window = cfg.get("sliding_window") if cfg.get("use_sliding_window", False) else None
        return Qwen2Args(
            vocab_size=int(require(cfg, "vocab_size", "qwen2")),
            hidden_size=hidden_size,
            intermediate_size=int(require(cfg, "intermediate_size", "qwen2")),
            num_hidden_layers=num_layers,
            num_attention_heads=num_heads,
            num_key_value_heads=num_kv_heads,
            head_dim=head_dim,
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            rope_theta=theta,
            rope_scaling=scaling,
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            sliding_window=window,
            sliding_layers=window_layers(cfg, num_layers, window, "qwen2"),
        )


class Qwen2Attention(nn.Module):
    def __init__(self, args: Qwen2Args, rotary: RotaryEmbedding, sliding_window: int | None) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = (
            args.num_attention_heads, args.num_key_value_heads, args.head_dim)
        q_size = self.num_heads * self.head_dim
        kv_size = self.num_kv_heads * self.head_dim
        self.qkv_proj = Linear(args.hidden_size, q_size + 2 * kv_size, bias=True)
        self.o_proj = Linear(q_size, args.hidden_size)
        self.rotary = rotary  # shared by every layer; holds no weights
        self.attn = Attention(self.num_heads, self.num_kv_heads, self.head_dim, self.head_dim**-0.5,
                              sliding_window=sliding_window)

    def forward(self, x: torch.Tensor, cos_sin: CosSin, kv_cache: KVCache,
                meta: AttentionMetadata) -> torch.Tensor:
        qkv = self.qkv_proj(x).view(-1, self.num_heads + 2 * self.num_kv_heads, self.head_dim)
        # q: [num_tokens, num_heads, head_dim]; k, v: [num_tokens, num_kv_heads, head_dim]
        q, k, v = qkv.split([self.num_heads, self.num_kv_heads, self.num_kv_heads], dim=1)
        q, k = self.rotary(q, k, cos_sin)
        return self.o_proj(self.attn(q, k, v, kv_cache, meta))


class Qwen2MLP(nn.Module):
    def __init__(self, args: Qwen2Args) -> None:
        super().__init__()
        self.intermediate_size = args.intermediate_size
        self.gate_up_proj = Linear(args.hidden_size, 2 * args.intermediate_size)
        self.down_proj = Linear(args.intermediate_size, args.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).split(self.intermediate_size, dim=-1)
        return self.down_proj(F.silu(gate) * up)  # [num_tokens, hidden_size]


class Qwen2Block(nn.Module):
    def __init__(self, args: Qwen2Args, rotary: RotaryEmbedding, sliding_window: int | None) -> None:
        super().__init__()
        self.self_attn = Qwen2Attention(args, rotary, sliding_window)
        self.mlp = Qwen2MLP(args)
        self.input_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)

    def forward(self, x: torch.Tensor, cos_sin: CosSin, kv_cache: KVCache,
                meta: AttentionMetadata) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos_sin, kv_cache, meta)
        return x + self.mlp(self.post_attention_layernorm(x))


class Qwen2Model(nn.Module):
    def __init__(self, args: Qwen2Args) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size,
                                         _weight=torch.empty(args.vocab_size, args.hidden_size), _freeze=True)
        self.rotary = RotaryEmbedding(args.head_dim, args.rope_theta, scaling=args.rope_scaling)
        self.layers = nn.ModuleList(
            Qwen2Block(args, self.rotary, args.sliding_window if sliding else None)
            for sliding in args.sliding_layers)
        self.norm = RMSNorm(args.hidden_size, args.rms_norm_eps)


class Qwen2ForCausalLM(DecoderLM):
    """Qwen2 over the paged KV cache (the `CausalLM` contract of `models/base.py`)."""

    def __init__(self, hf_config: dict[str, Any]) -> None:
        args = Qwen2Args.from_hf(hf_config)
        super().__init__(args, Qwen2Model(args))

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy HF tensors in; q/k/v and gate/up land in row ranges of the fused projections."""
        a = self.args
        load_dense_weights(self, weights, dense_splits(a.num_attention_heads, a.num_key_value_heads, a.head_dim,
                                                       a.intermediate_size), a.tie_word_embeddings)
