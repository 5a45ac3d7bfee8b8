"""RMSNorm in the two conventions found in checkpoints."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    """x / rms(x) * w, computed in float32 (Llama/Qwen/Mixtral/OLMoE convention).

    `offset=1.0` gives Gemma's `x / rms(x) * (1 + w)`.
    """

    def __init__(self, hidden_size: int, eps: float = 1e-6, offset: float = 0.0) -> None:
        super().__init__()
        self.eps = eps
        self.offset = offset
        self.weight = nn.Parameter(torch.ones(hidden_size) if offset == 0.0 else torch.zeros(hidden_size),
                                   requires_grad=False)
        self._cached_key: tuple[int, int] | None = None
        self._cached: torch.Tensor | None = None

    def _offset_weight(self) -> torch.Tensor:
        """`offset + weight`, recomputed only when the weight changes (its version counter moves
        on every in-place write, e.g. loading)."""
        try:
            key = (self.weight.data_ptr(), self.weight._version)
        except RuntimeError:  # an inference tensor has no version counter: nothing to cache on
            return self.offset + self.weight
        if self._cached is None or self._cached_key != key:
            self._cached = self.offset + self.weight.detach()
            self._cached_key = key
        return self._cached

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = (x.shape[-1],)
        if x.dtype == torch.float32:  # one fused op instead of six
            if self.offset == 0.0:
                return F.rms_norm(x, shape, self.weight, self.eps)
            return F.rms_norm(x, shape, self._offset_weight(), self.eps)
        dtype = x.dtype
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.offset == 0.0:
            return self.weight * xf.to(dtype)  # HF Llama casts before scaling
        return (xf * (self.offset + self.weight.float())).to(dtype)
