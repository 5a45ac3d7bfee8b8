"""Linear layer: dense weights, or one quantized format (`layers/quant.py`) used for every call.

At decode a step reads every weight once for a handful of tokens: the cost is bytes read, so int8
(4x fewer bytes than fp32) and int4 (8x fewer) weights run faster; on the 2-core AVX-512 machines
here the int8/int4 kernels also beat the fp32 matmul up to prefill-sized batches (512 rows), so a
quantized `Linear` uses its quantized weights for every batch size. The same request then computes
with the same weights whether it runs alone or beside others, in prefill or in decode.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mixserve.layers.invariant import tiled_linear
from mixserve.layers.quant import Int8Weight, QuantizedWeight, QuantMode, quantize_int8, quantize_weight

__all__ = ["Linear", "enable_int8", "quantize_int8", "quantize_linears"]


class Linear(nn.Module):
    """y = x W^T (+ b). `weight` is `[out_features, in_features]` like torch.nn.Linear.

    With `quant` set, every call multiplies by the quantized weight (bf16 activations inside the
    kernel, float32 in and out); the dense `weight` is kept for callers that read it.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = False) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features), requires_grad=False)
        self.bias = nn.Parameter(torch.zeros(out_features), requires_grad=False) if bias else None
        self.quant: QuantizedWeight | None = None
        self.invariant = False
        """Batch-invariant mode (`layers/invariant.py`): dense weights run in fixed-size row tiles."""

    def quantize(self, mode: QuantMode) -> None:
        """Build the quantized weight used from now on for every call (see `QuantMode`)."""
        self.quant = quantize_weight(self.weight.data, mode)

    def enable_int8(self) -> None:
        """Use an int8 per-channel copy of the weight for every call."""
        self.quant = quantize_int8(self.weight.data)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.quant is None:
            if self.invariant:
                return tiled_linear(x, self.weight, self.bias)
            return F.linear(x, self.weight, self.bias)
        if x.dim() == 2:  # the runner's packed `[num_tokens, in_features]`: no reshapes
            y = self.quant.matmul(x).to(x.dtype)
        else:
            y = self.quant.matmul(x.reshape(-1, self.in_features)).to(x.dtype)
            y = y.view(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias


def quantize_linears(module: nn.Module, mode: QuantMode) -> dict[str, int]:
    """Quantize every `Linear` under `module` (deterministic: the format follows from the weights and
    `mode`, never from timing); returns how many Linears got each format ("int4", "int8")."""
    counts = {"int4": 0, "int8": 0}
    threads = torch.get_num_threads()
    # One thread: these elementwise passes are memory-bound, and torch's multi-threaded ones stall
    # badly when the cores are oversubscribed (the same reason dequant.py uses numpy).
    torch.set_num_threads(1)
    try:
        for sub in module.modules():
            if isinstance(sub, Linear):
                sub.quantize(mode)
                counts["int8" if isinstance(sub.quant, Int8Weight) else "int4"] += 1
    finally:
        torch.set_num_threads(threads)
    return counts


def enable_int8(module: nn.Module) -> int:
    """Give every `Linear` under `module` int8 weights; returns how many were converted."""
    return quantize_linears(module, "int8")["int8"]
