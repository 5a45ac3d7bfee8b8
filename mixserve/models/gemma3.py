"""Gemma3 text (`Gemma3ForCausalLM`, model_type gemma3_text).

Differences from Llama: the embedding is scaled by sqrt(hidden_size); every RMSNorm is `(1 + w)`;
each block has four norms (around attention and around the MLP); q/k heads are RMS-normed before
RoPE; the MLP is GeGLU (tanh gelu); the attention scale is `query_pre_attn_scalar ** -0.5`. Layers
alternate sliding-window attention (local RoPE base) with full attention (global base and scaling),
and the final logits may be tanh-softcapped.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from itertools import islice
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mixserve.layers.attention import Attention, AttentionMetadata, KVCache
from mixserve.layers.linear import Linear
from mixserve.layers.norm import RMSNorm
from mixserve.layers.rotary import RotaryEmbedding
from mixserve.models.base import check_layer_range
from mixserve.models.decoder import DecoderLM
from mixserve.models.hf_config import require
from mixserve.models.weights import dense_splits, load_dense_weights

CosSin = tuple[torch.Tensor, torch.Tensor]
RopeSpec = tuple[float, dict[str, Any] | None]


def _sliding_layers(cfg: dict[str, Any], num_layers: int) -> tuple[bool, ...]:
    """`layer_types` when given, else the older `sliding_window_pattern` (every n-th layer is full)."""
    types = cfg.get("layer_types")
    if types is not None:
        if len(types) != num_layers:
            raise ValueError(f"gemma3: layer_types has {len(types)} entries for {num_layers} layers")
        return tuple(t == "sliding_attention" for t in types)
    pattern = int(cfg.get("sliding_window_pattern") or cfg.get("_sliding_window_pattern") or 6)
    return tuple((i + 1) % pattern != 0 for i in range(num_layers))


def _rope(cfg: dict[str, Any]) -> tuple[RopeSpec, RopeSpec]:
    """(base, scaling) for the sliding layers and for the full-attention layers.

    HF 5.x writes `rope_parameters` keyed by layer type; older configs have `rope_local_base_freq`
    for sliding layers and `rope_theta` + `rope_scaling` for full-attention layers.
    """
    params = cfg.get("rope_parameters") or {}
    local_theta = float(cfg.get("rope_local_base_freq", 10000.0))
    global_theta = float(cfg.get("rope_theta", 1_000_000.0))
    if "full_attention" in params or "sliding_attention" in params:
        local = dict(params.get("sliding_attention") or {})
        full = dict(params.get("full_attention") or {})
        return ((float(local.get("rope_theta", local_theta)), local or None),
                (float(full.get("rope_theta", global_theta)), full or None))
    full = dict(params or cfg.get("rope_scaling") or {})
    return (local_theta, None), (float(full.get("rope_theta", global_theta)), full or None)


@dataclass(frozen=True)
class Gemma3Args:
    """The part of an HF Gemma3 text config.json this module reads."""

    vocab_size: int
    """Rows of the embedding and the LM head."""
    hidden_size: int
    """Width of the residual stream."""
    intermediate_size: int
    """Width of the GeGLU MLP."""
    num_hidden_layers: int
    """Decoder blocks."""
    num_attention_heads: int
    """Query heads."""
    num_key_value_heads: int
    """KV heads (GQA); defaults to `num_attention_heads`."""
    head_dim: int
    """Channels per head (independent of `hidden_size`); 256, HF's default, when absent."""
    rms_norm_eps: float
    """Epsilon of every RMSNorm."""
    query_pre_attn_scalar: float
    """Attention scores are scaled by `query_pre_attn_scalar ** -0.5` (not `head_dim ** -0.5`)."""
    sliding_window: int | None
    """Attention window of the sliding layers (a key j is visible from position p if p - j < window)."""
    sliding_layers: tuple[bool, ...]
    """Per layer: True for sliding-window attention with local RoPE, False for full attention."""
    rope_local: RopeSpec
    """(base, scaling) of RoPE in the sliding layers."""
    rope_global: RopeSpec
    """(base, scaling) of RoPE in the full-attention layers."""
    final_logit_softcapping: float | None
    """Logits become `cap * tanh(logits / cap)`; None for no cap."""
    attn_logit_softcapping: float | None
    """Read for completeness only: HF's Gemma3 never applies it (unlike Gemma2), so neither do we."""
    tie_word_embeddings: bool
    """The LM head shares the embedding matrix (the Gemma default)."""

    @staticmethod
    def from_hf(cfg: dict[str, Any]) -> Gemma3Args:
        num_heads = int(require(cfg, "num_attention_heads", "gemma3"))
        num_layers = int(require(cfg, "num_hidden_layers", "gemma3"))
        act = cfg.get("hidden_activation") or cfg.get("hidden_act") or "gelu_pytorch_tanh"
        if act != "gelu_pytorch_tanh":
            raise ValueError(f"gemma3: unsupported hidden_activation {act!r} (only 'gelu_pytorch_tanh')")
        if cfg.get("use_bidirectional_attention"):
            raise ValueError("gemma3: use_bidirectional_attention=True (embedding models) is not supported")
        rope_local, rope_global = _rope(cfg)
        final_cap = cfg.get("final_logit_softcapping")
        attn_cap = cfg.get("attn_logit_softcapping")
        return Gemma3Args(
            vocab_size=int(require(cfg, "vocab_size", "gemma3")),
            hidden_size=int(require(cfg, "hidden_size", "gemma3")),
            intermediate_size=int(require(cfg, "intermediate_size", "gemma3")),
            num_hidden_layers=num_layers,
            num_attention_heads=num_heads,
            num_key_value_heads=int(cfg.get("num_key_value_heads") or num_heads),
            head_dim=int(cfg.get("head_dim") or 256),
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            query_pre_attn_scalar=float(cfg.get("query_pre_attn_scalar", 256)),
            sliding_window=cfg.get("sliding_window"),
            sliding_layers=_sliding_layers(cfg, num_layers),
            rope_local=rope_local,
            rope_global=rope_global,
            final_logit_softcapping=float(final_cap) if final_cap is not None else None,
            attn_logit_softcapping=float(attn_cap) if attn_cap is not None else None,
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", True)),
        )


class Gemma3Attention(nn.Module):
    def __init__(self, args: Gemma3Args, rotary: RotaryEmbedding, sliding_window: int | None) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = (
            args.num_attention_heads, args.num_key_value_heads, args.head_dim)
        q_size = self.num_heads * self.head_dim
        kv_size = self.num_kv_heads * self.head_dim
        self.qkv_proj = Linear(args.hidden_size, q_size + 2 * kv_size)
        self.o_proj = Linear(q_size, args.hidden_size)
        self.q_norm = RMSNorm(self.head_dim, args.rms_norm_eps, offset=1.0)
        self.k_norm = RMSNorm(self.head_dim, args.rms_norm_eps, offset=1.0)
        self.rotary = rotary  # the local or global RoPE, shared with the other layers of that kind
        self.attn = Attention(self.num_heads, self.num_kv_heads, self.head_dim,
                              args.query_pre_attn_scalar**-0.5, sliding_window=sliding_window)

    def forward(self, x: torch.Tensor, cos_sin: CosSin, kv_cache: KVCache,
                meta: AttentionMetadata) -> torch.Tensor:
        qkv = self.qkv_proj(x).view(-1, self.num_heads + 2 * self.num_kv_heads, self.head_dim)
        # q: [num_tokens, num_heads, head_dim]; k, v: [num_tokens, num_kv_heads, head_dim]
        q, k, v = qkv.split([self.num_heads, self.num_kv_heads, self.num_kv_heads], dim=1)
        q, k = self.q_norm(q), self.k_norm(k)  # per head, before RoPE
        q, k = self.rotary(q, k, cos_sin)
        return self.o_proj(self.attn(q, k, v, kv_cache, meta))


class Gemma3MLP(nn.Module):
    def __init__(self, args: Gemma3Args) -> None:
        super().__init__()
        self.intermediate_size = args.intermediate_size
        self.gate_up_proj = Linear(args.hidden_size, 2 * args.intermediate_size)
        self.down_proj = Linear(args.intermediate_size, args.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).split(self.intermediate_size, dim=-1)
        return self.down_proj(F.gelu(gate, approximate="tanh") * up)  # [num_tokens, hidden_size]


class Gemma3Block(nn.Module):
    def __init__(self, args: Gemma3Args, rotary: RotaryEmbedding, sliding_window: int | None) -> None:
        super().__init__()
        self.self_attn = Gemma3Attention(args, rotary, sliding_window)
        self.mlp = Gemma3MLP(args)
        norm = lambda: RMSNorm(args.hidden_size, args.rms_norm_eps, offset=1.0)
        self.input_layernorm, self.post_attention_layernorm = norm(), norm()
        self.pre_feedforward_layernorm, self.post_feedforward_layernorm = norm(), norm()

    def forward(self, x: torch.Tensor, cos_sin: CosSin, kv_cache: KVCache,
                meta: AttentionMetadata) -> torch.Tensor:
        attn = self.self_attn(self.input_layernorm(x), cos_sin, kv_cache, meta)
        x = x + self.post_attention_layernorm(attn)
        return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))


BlockFactory = Callable[[int, RotaryEmbedding, int | None], nn.Module]
"""(layer index, its RoPE, its attention window) -> a block; lets the MoE family (`gemma3_moe.py`) reuse
the trunk with its own blocks."""


class Gemma3Model(nn.Module):
    def __init__(self, args: Gemma3Args, make_block: BlockFactory | None = None) -> None:
        super().__init__()
        block = make_block or (lambda _i, rotary, window: Gemma3Block(args, rotary, window))
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size,
                                         _weight=torch.empty(args.vocab_size, args.hidden_size), _freeze=True)
        # A buffer so that `.to(dtype)` rounds it like HF does (the scale is applied in activation dtype).
        self.register_buffer("embed_scale", torch.tensor(args.hidden_size**0.5), persistent=False)
        self.rotary_local = RotaryEmbedding(args.head_dim, args.rope_local[0], scaling=args.rope_local[1])
        self.rotary_global = RotaryEmbedding(args.head_dim, args.rope_global[0], scaling=args.rope_global[1])
        self.sliding_layers = args.sliding_layers
        self.layers = nn.ModuleList(
            block(i, self.rotary_local, args.sliding_window) if sliding else block(i, self.rotary_global, None)
            for i, sliding in enumerate(args.sliding_layers))
        self.norm = RMSNorm(args.hidden_size, args.rms_norm_eps, offset=1.0)


class Gemma3ForCausalLM(DecoderLM):
    """Gemma3 text over the paged KV cache (the `CausalLM` contract of `models/base.py`)."""

    def __init__(self, hf_config: dict[str, Any]) -> None:
        args = Gemma3Args.from_hf(hf_config)
        super().__init__(args, Gemma3Model(args))

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return gemma3_embed(self.model, input_ids)

    def forward_layers(self, hidden: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
                       kv_caches: list[KVCache], start: int, end: int) -> torch.Tensor:
        return gemma3_layers(self.model, self.args, hidden, positions, meta, kv_caches, start, end)

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        return gemma3_head(self.model, self.lm_head, self.args, hidden)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy HF tensors in; q/k/v and gate/up land in row ranges of the fused projections."""
        a = self.args
        load_dense_weights(self, weights, dense_splits(a.num_attention_heads, a.num_key_value_heads, a.head_dim,
                                                       a.intermediate_size), a.tie_word_embeddings)


def gemma3_embed(trunk: Gemma3Model, input_ids: torch.Tensor) -> torch.Tensor:
    """The scaled embedding: `[num_tokens]` -> `[num_tokens, hidden_size]`."""
    return trunk.embed_tokens(input_ids) * trunk.embed_scale


def gemma3_layers(trunk: Gemma3Model, args: Gemma3Args, hidden: torch.Tensor, positions: torch.Tensor,
                  meta: AttentionMetadata, kv_caches: list[KVCache], start: int, end: int,
                  *extra: object) -> torch.Tensor:
    """Blocks `[start, end)`, each with its kind's RoPE table; `extra` goes to every block after the
    metadata (the MoE family: provider, observer)."""
    check_layer_range(start, end, args.num_hidden_layers, kv_caches)
    # Both RoPE tables once per stage, shared by every layer of their kind.
    local_cos_sin = trunk.rotary_local.cos_sin(positions)
    global_cos_sin = trunk.rotary_global.cos_sin(positions)
    blocks = zip(islice(trunk.layers, start, end), args.sliding_layers[start:end], kv_caches)
    for layer, sliding, kv_cache in blocks:
        hidden = layer(hidden, local_cos_sin if sliding else global_cos_sin, kv_cache, meta, *extra)
    return hidden  # [num_tokens, hidden_size]


def gemma3_head(trunk: Gemma3Model, lm_head: nn.Module, args: Gemma3Args, hidden: torch.Tensor) -> torch.Tensor:
    """Final `(1 + w)` norm, LM head, optional tanh softcap: `[n, hidden_size]` -> `[n, vocab_size]` float32."""
    logits = lm_head(trunk.norm(hidden)).float()
    cap = args.final_logit_softcapping
    return logits if cap is None else torch.tanh(logits / cap) * cap
