"""Rotary position embedding (rotate-half / NeoX layout, as HF checkpoints store q/k).

GGUF llama checkpoints store q/k rows interleaved; the GGUF loader un-permutes them so that this one
layout serves every family.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn


def _inv_freq(rotary_dim: int, base: float, scaling: dict[str, Any] | None) -> torch.Tensor:
    inv = 1.0 / (base ** (torch.arange(0, rotary_dim, 2, dtype=torch.float64) / rotary_dim))
    kind = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
    if kind in (None, "default"):
        return inv.float()
    assert scaling is not None
    if kind == "linear":
        return (inv / float(scaling["factor"])).float()
    if kind == "llama3":
        factor = float(scaling["factor"])
        low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
        old_len = float(scaling["original_max_position_embeddings"])
        wavelen = 2 * math.pi / inv
        low_wavelen, high_wavelen = old_len / low, old_len / high
        smooth = (old_len / wavelen - low) / (high - low)
        scaled = torch.where(wavelen > low_wavelen, inv / factor, inv)
        mid = (1 - smooth) * scaled / factor + smooth * scaled
        is_mid = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        return torch.where(is_mid, mid, scaled).float()
    raise ValueError(f"unsupported rope_scaling type {kind!r}")


class RotaryEmbedding(nn.Module):
    """Applies RoPE to the first `rotary_dim` channels of q and k (`[num_tokens, heads, head_dim]`)."""

    def __init__(self, head_dim: int, base: float, rotary_dim: int | None = None,
                 scaling: dict[str, Any] | None = None) -> None:
        super().__init__()
        self.head_dim = head_dim
        self.rotary_dim = rotary_dim or head_dim
        # A plain attribute, not a buffer: `module.to(bfloat16)` must not round the frequencies
        # (bf16 inv_freq puts the angle off by radians at a few hundred positions).
        self.inv_freq = _inv_freq(self.rotary_dim, base, scaling)  # [rotary_dim // 2] float32

    def cos_sin(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`[num_tokens, 1, rotary_dim]` cos and signed sin (`[-sin, sin]` halves), float32.

        With the signed sin, rotate-half becomes one `roll`: rotate_half(x) * sin ==
        roll(x, half) * signed_sin, so applying RoPE costs four ops per tensor.
        """
        freqs = positions.float()[:, None] * self.inv_freq[None, :]
        sin = freqs.sin()
        emb_cos = freqs.cos().repeat(1, 2)[:, None, :]
        emb_sin = torch.cat((-sin, sin), dim=-1)[:, None, :]
        return emb_cos, emb_sin

    def forward(self, q: torch.Tensor, k: torch.Tensor,
                cos_sin: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        cos, sin = cos_sin
        return _apply(q, cos, sin, self.rotary_dim), _apply(k, cos, sin, self.rotary_dim)

    def rotate(self, x: torch.Tensor, cos_sin: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """RoPE on `[num_tokens, heads, head_dim]` (e.g. q and k heads side by side in one view of
        the fused qkv output: four ops for both instead of eight)."""
        return _apply(x, cos_sin[0], cos_sin[1], self.rotary_dim)


def _apply(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rotary_dim: int) -> torch.Tensor:
    half = rotary_dim // 2
    if rotary_dim == x.shape[-1] and x.dtype == torch.float32:
        return x * cos + x.roll(half, dims=-1) * sin
    dtype = x.dtype
    rot, rest = x[..., :rotary_dim].float(), x[..., rotary_dim:]
    out = (rot * cos + rot.roll(half, dims=-1) * sin).to(dtype)
    return out if rest.shape[-1] == 0 else torch.cat((out, rest), dim=-1)
