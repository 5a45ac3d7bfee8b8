"""Weight-only quantized formats for `Linear`: int8 per output channel and int4 in groups of 32.

Every call of a quantized `Linear` (prefill, decode, any batch size) runs the same quantized weights,
so a request scores the same whatever else is batched with it; only the kernel's reduction order may
differ between batch shapes. No kernel is chosen by timing: the format follows from the weights.

int4 (`Int4Weight`): `w = (q - 8) * scale + zero` per group of 32 inputs, q in 0..15, run by torch's
`_weight_int4pack_mm_for_cpu` (bf16 activations, bf16 scale/zero). A group whose 32 values lie on a
16-level evenly spaced grid (every Q4_0 / Q4_1 / Q4_K block of a GGUF file, once dequantized) is
re-encoded exactly: `find_grid` recovers its step and offset. Any other group gets min/max
asymmetric rounding (error at most half a step, `(max - min) / 30`).

int8 (`Int8Weight`): symmetric per output channel, `w = q * scale`, q in -127..127 (error at most
`max|row| / 254`), run by `_weight_int8pack_mm` (bf16 activations, bf16 scales).

Both kernels round the activations and the scales to bfloat16, so a quantized matmul differs from the
fp32 matmul of its own dequantized weights by about 2^-8 of the output's scale (tests state the bound).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Protocol

import torch

GROUP_SIZE = 32
"""Inputs per int4 group: the block of GGUF's Q4_0/Q4_1 and the sub-block of Q4_K."""
_ROWS_PER_CHUNK = 4096
"""Rows quantized at once (bounds the temporary memory of the grid search)."""

QuantMode = Literal["int4", "int8", "native"]
"""int4 / int8: every Linear in that format (int4 falls back to int8 where the shape does not fit
the kernel). native: int4 where the weights are already exactly 4-bit per group of 32 (GGUF Q4_*),
int8 elsewhere."""


class QuantizedWeight(Protocol):
    """A quantized `[out_features, in_features]` weight that multiplies `[num_rows, in_features]`."""

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """`x @ W^T` as float32-compatible `[num_rows, out_features]` (in the kernel's dtype)."""
        ...

    def dequantize(self) -> torch.Tensor:
        """The float32 weight this format represents (the reference for tests)."""
        ...


@dataclass(frozen=True)
class Int8Weight:
    qweight: torch.Tensor
    """`[out_features, in_features]` int8."""
    scales: torch.Tensor
    """`[out_features]` bfloat16."""

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        return torch._weight_int8pack_mm(x.to(torch.bfloat16), self.qweight, self.scales)

    def dequantize(self) -> torch.Tensor:
        return self.qweight.float() * self.scales.float()[:, None]


@dataclass(frozen=True)
class Int4Weight:
    packed: torch.Tensor
    """`[out_features, in_features // 2]` uint8 in torch's CPU int4 packing."""
    scale_zeros: torch.Tensor
    """`[in_features // GROUP_SIZE, out_features, 2]` bfloat16: (scale, zero) per group and output."""
    exact_groups: float
    """Share of groups re-encoded exactly (1.0 for GGUF Q4_* weights)."""

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.aten._weight_int4pack_mm_for_cpu(x.to(torch.bfloat16), self.packed, GROUP_SIZE,
                                                          self.scale_zeros)

    def dequantize(self) -> torch.Tensor:
        # The kernel is the only reader of its packing: multiply the identity (in float32, so
        # nothing is rounded to bfloat16 on the way out) to unpack.
        eye = torch.eye(self.scale_zeros.shape[0] * GROUP_SIZE)
        return torch.ops.aten._weight_int4pack_mm_for_cpu(
            eye, self.packed, GROUP_SIZE, self.scale_zeros.float()).t().contiguous()


def quantize_int8(weight: torch.Tensor) -> Int8Weight:
    """Symmetric per-output-channel int8 of a `[out, in]` weight."""
    w = weight.float()
    scales = w.abs().amax(dim=1).clamp(min=1e-8) / 127.0
    q = torch.round(w / scales[:, None]).clamp(-127, 127).to(torch.int8)
    return Int8Weight(q.contiguous(), scales.to(torch.bfloat16))


def int4_fits(out_features: int, in_features: int) -> bool:
    """Whether the int4 kernel takes this shape (N a multiple of 16, K of the group size)."""
    return out_features % 16 == 0 and in_features % GROUP_SIZE == 0 and in_features > 0


def find_grid(groups: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per group of `[num_groups, GROUP_SIZE]` float32 values: (q uint8 0..15, step, zero, exact).

    `(q - 8) * step + zero` reproduces a group exactly (`exact` True) when its values lie on an evenly
    spaced grid of at most 16 levels: the step is then the smallest gap between distinct sorted
    values, and every value is an integer number of steps above the minimum. Other groups get
    `step = (max - min) / 15` and rounded q. The sort is skipped when the min/max grid is already
    exact everywhere (GGUF Q4_1 blocks, whose minimum and maximum are levels 0 and 15).
    """
    low = groups.amin(dim=1)
    high = groups.amax(dim=1)
    span = high - low
    tol = span * 1e-5 + 1e-30
    minmax_step = torch.where(span > 0, span / 15, torch.ones_like(span))
    level = (groups - low[:, None]) / minmax_step[:, None]
    exact = ((level - level.round()).abs() <= 1e-3).all(dim=1)
    step = minmax_step
    if not bool(exact.all()):
        values = groups.sort(dim=1).values
        gaps = values.diff(dim=1)
        gaps = torch.where(gaps > tol[:, None], gaps, torch.full_like(gaps, float("inf")))
        grid_step = gaps.amin(dim=1)
        grid_step = torch.where(torch.isfinite(grid_step), grid_step, torch.ones_like(grid_step))
        level = (groups - low[:, None]) / grid_step[:, None]
        on_grid = ((level - level.round()).abs() <= 1e-3).all(dim=1) & (level.round().amax(dim=1) <= 15)
        step = torch.where(on_grid & ~exact, grid_step, step)
        exact = exact | on_grid
    level = ((groups - low[:, None]) / step[:, None]).round().clamp(0, 15)
    # Shift the levels (q = level + k, zero = low + (8 - k) * step) so that zero is as small as the
    # 16 codes allow: zero is stored in bfloat16, and a small zero loses little to that rounding.
    room = 15 - level.amax(dim=1)
    shift = torch.minimum(torch.maximum((low / step + 8).round(), torch.zeros_like(room)), room)
    q = (level + shift[:, None]).to(torch.uint8)
    return q, step, low + (8 - shift) * step, exact


def quantize_int4(weight: torch.Tensor) -> Int4Weight:
    """Group-wise int4 of a `[out, in]` weight (shape must satisfy `int4_fits`); see `find_grid`."""
    out_features, in_features = weight.shape
    if not int4_fits(out_features, in_features):
        raise ValueError(f"int4 needs out_features % 16 == 0 and in_features % {GROUP_SIZE} == 0, "
                         f"got {tuple(weight.shape)}")
    num_groups = in_features // GROUP_SIZE
    qs, scales, zeros = [], [], []
    num_exact = 0
    for start in range(0, out_features, _ROWS_PER_CHUNK):
        rows = weight[start:start + _ROWS_PER_CHUNK].float()
        q, step, zero, exact = find_grid(rows.reshape(-1, GROUP_SIZE))
        num_exact += int(exact.sum())
        qs.append(torch.ops.aten._convert_weight_to_int4pack_for_cpu(
            q.view(rows.shape[0], in_features).to(torch.int32), 1))
        scales.append(step.view(-1, num_groups))
        zeros.append(zero.view(-1, num_groups))
    scale = torch.cat(scales).t()  # [num_groups, out_features]
    zero = torch.cat(zeros).t()
    scale_zeros = torch.stack((scale, zero), dim=-1).to(torch.bfloat16).contiguous()
    return Int4Weight(torch.cat(qs), scale_zeros, num_exact / (out_features * num_groups))


def _sample_is_int4(weight: torch.Tensor) -> bool:
    """Cheap rejection before the whole weight is searched: are the first 64 rows exactly 4-bit?"""
    return bool(find_grid(weight[:64].float().reshape(-1, GROUP_SIZE))[3].all())


def quantize_weight(weight: torch.Tensor, mode: QuantMode) -> QuantizedWeight:
    """The quantized form of one `[out, in]` weight under `mode` (see `QuantMode`)."""
    out_features, in_features = weight.shape
    if mode == "int8" or not int4_fits(out_features, in_features):
        return quantize_int8(weight)
    if mode == "native":
        if not _sample_is_int4(weight):
            return quantize_int8(weight)
        q4 = quantize_int4(weight)
        return q4 if q4.exact_groups == 1.0 else quantize_int8(weight)
    return quantize_int4(weight)
