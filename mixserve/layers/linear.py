"""Linear layer that keeps dense weights and, optionally, an int8 per-channel copy for small batches.

At decode, a step reads every weight once for a handful of tokens: the cost is bytes read, so int8
weights (4x fewer bytes than fp32) run ~2.5x faster. Large batches are compute-bound, where the dense
fp32 matmul wins. `int8_max_tokens` is the crossover measured on a 2-core AVX-512 machine.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

INT8_MAX_TOKENS = 16
"""Use the int8 kernel when a call has at most this many rows (measured crossover)."""


def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel int8: returns (`[out, in]` int8, `[out]` scales)."""
    w = weight.float()
    scales = w.abs().amax(dim=1).clamp(min=1e-8) / 127.0
    q = torch.round(w / scales[:, None]).clamp(-127, 127).to(torch.int8)
    return q.contiguous(), scales


class Linear(nn.Module):
    """y = x W^T (+ b). `weight` is `[out_features, in_features]` like torch.nn.Linear."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features), requires_grad=False)
        self.bias = nn.Parameter(torch.zeros(out_features), requires_grad=False) if bias else None
        self.qweight: torch.Tensor | None = None
        self.qscales: torch.Tensor | None = None

    def enable_int8(self) -> None:
        """Build the int8 copy used for calls with at most INT8_MAX_TOKENS rows."""
        self.qweight, scales = quantize_int8(self.weight.data)
        self.qscales = scales.to(torch.bfloat16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.qweight is not None and x.numel() // self.in_features <= INT8_MAX_TOKENS:
            assert self.qscales is not None
            shape = x.shape
            y = torch._weight_int8pack_mm(x.reshape(-1, self.in_features).to(torch.bfloat16),
                                          self.qweight, self.qscales)
            y = y.to(x.dtype).view(*shape[:-1], self.out_features)
            return y if self.bias is None else y + self.bias
        return F.linear(x, self.weight, self.bias)


def enable_int8(module: nn.Module, measure: bool = True) -> int:
    """Give `Linear`s under `module` an int8 copy where it is faster; returns how many were converted.

    The int8 kernel's speed depends on the shape and the CPU (on some shapes it is 20x slower than
    fp32 on one machine we measured), so with `measure` each distinct shape is timed once for a
    single row, int8 against dense, and only shapes where int8 wins get a copy.
    """
    decisions: dict[tuple[int, int], bool] = {}
    count = 0
    for sub in module.modules():
        if not isinstance(sub, Linear):
            continue
        shape = (sub.in_features, sub.out_features)
        if shape not in decisions:
            sub.enable_int8()
            decisions[shape] = not measure or _int8_is_faster(sub)
        if decisions[shape]:
            if sub.qweight is None:
                sub.enable_int8()
            count += 1
        else:
            sub.qweight = sub.qscales = None
    return count


def _int8_is_faster(layer: Linear) -> bool:
    """Time one-row calls of the int8 kernel and of the dense matmul (best of a few)."""
    x = torch.randn(1, layer.in_features, dtype=layer.weight.dtype)
    assert layer.qweight is not None and layer.qscales is not None
    qweight, qscales = layer.qweight, layer.qscales
    int8 = lambda: torch._weight_int8pack_mm(x.to(torch.bfloat16), qweight, qscales)
    dense = lambda: F.linear(x, layer.weight)
    return _best_time(int8) < 0.9 * _best_time(dense)


def _best_time(fn: Callable[[], torch.Tensor], repeats: int = 5) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best
