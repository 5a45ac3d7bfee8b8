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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = (x.shape[-1],)
        if x.dtype == torch.float32:  # one fused op instead of six
            if self.offset == 0.0:
                return F.rms_norm(x, shape, self.weight, self.eps)
            return F.rms_norm(x, shape, None, self.eps) * (self.offset + self.weight)
        dtype = x.dtype
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.offset == 0.0:
            return self.weight * xf.to(dtype)  # HF Llama casts before scaling
        return (xf * (self.offset + self.weight.float())).to(dtype)
