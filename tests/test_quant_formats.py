"""Quantized weight formats (`layers/quant.py`) against the dense matmul of the same weights.

Every GGUF type's blocks are dequantized (the dense reference) and quantized as the engine does
(`native`: int4 for 4-bit types, re-encoded exactly, int8 elsewhere; or forced int4 / int8).

Stated tolerances (bf16 activations, bf16 scales and a bf16 output inside both kernels):
- the format's own dequantized weights vs the dense ones, per element:
  int4 of a Q4_* weight: <= 2^-8 * max|row| (exact codes; only the bf16 rounding of step and zero);
  int8: <= max|row| / 254 + 2^-8 * max|row| (half an int8 step, plus the bf16 scale);
  int4 of non-4-bit weights: <= (max - min) / 30 of the group + 2^-8 * max|row| (half a step).
- the quantized matmul vs the fp32 matmul of the format's own dequantized weights, per output:
  <= 2^-7 * (|x| @ |W|^T) (activation and output rounding to bf16).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType
from gguf.quants import quantize as gguf_quantize

from mixserve.layers.linear import Linear, quantize_linears
from mixserve.layers.quant import GROUP_SIZE, Int4Weight, Int8Weight, quantize_weight
from mixserve.loading.dequant import dequantize_raw
from tests.loading.test_dequant import random_blocks

Q = GGMLQuantizationType
ROWS, COLS = 64, 512
FOUR_BIT = [Q.Q4_0, Q.Q4_1, Q.Q4_K]
WIDER = [Q.Q5_0, Q.Q5_1, Q.Q5_K, Q.Q6_K, Q.Q8_0]


def dense_from(qtype: GGMLQuantizationType) -> torch.Tensor:
    """`[ROWS, COLS]` float32 weights as the loader dequantizes them from `qtype` blocks."""
    if qtype in (Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0):  # llama.cpp's reference quantizers
        w = np.random.default_rng(1).standard_normal((ROWS, COLS)).astype(np.float32) * 0.05
        raw = gguf_quantize(w, qtype)
    else:  # gguf has no K-quant quantizer: random well-formed blocks
        raw = random_blocks(qtype, ROWS, COLS, seed=2)
    return dequantize_raw(raw, qtype).float()


def check_matmul(quant: Int4Weight | Int8Weight, dense: torch.Tensor) -> None:
    x = torch.randn(5, dense.shape[1], generator=torch.Generator().manual_seed(0))
    own = quant.dequantize()
    y = quant.matmul(x).float()
    bound = 2**-7 * (x.abs() @ own.abs().t()) + 1e-6
    assert ((y - x @ own.t()).abs() <= bound).all()


@pytest.mark.parametrize("qtype", FOUR_BIT, ids=lambda q: q.name)
def test_four_bit_gguf_runs_int4_exactly(qtype: GGMLQuantizationType) -> None:
    dense = dense_from(qtype)
    quant = quantize_weight(dense, "native")
    assert isinstance(quant, Int4Weight) and quant.exact_groups == 1.0
    row_max = dense.abs().amax(dim=1, keepdim=True)
    assert ((quant.dequantize() - dense).abs() <= 2**-8 * row_max).all()
    check_matmul(quant, dense)


@pytest.mark.parametrize("qtype", WIDER, ids=lambda q: q.name)
def test_wider_gguf_runs_int8(qtype: GGMLQuantizationType) -> None:
    dense = dense_from(qtype)
    quant = quantize_weight(dense, "native")
    assert isinstance(quant, Int8Weight)
    row_max = dense.abs().amax(dim=1, keepdim=True)
    assert ((quant.dequantize() - dense).abs() <= row_max / 254 + 2**-8 * row_max).all()
    check_matmul(quant, dense)


def test_forced_int4_of_dense_weights_is_within_half_a_step() -> None:
    dense = torch.randn(ROWS, COLS, generator=torch.Generator().manual_seed(3))  # HF-like, no grid
    quant = quantize_weight(dense, "int4")
    assert isinstance(quant, Int4Weight) and quant.exact_groups == 0.0
    groups = dense.view(ROWS, -1, GROUP_SIZE)
    half_step = ((groups.amax(-1) - groups.amin(-1)) / 30).repeat_interleave(GROUP_SIZE, dim=1)
    row_max = dense.abs().amax(dim=1, keepdim=True)
    assert ((quant.dequantize() - dense).abs() <= half_step * 1.001 + 2**-8 * row_max).all()
    check_matmul(quant, dense)


def test_shapes_the_int4_kernel_cannot_take_fall_back_to_int8() -> None:
    assert isinstance(quantize_weight(torch.randn(40, 64), "int4"), Int8Weight)  # 40 % 16 != 0
    assert isinstance(quantize_weight(torch.randn(32, 48), "int4"), Int8Weight)  # 48 % 32 != 0


def test_linear_uses_its_format_for_every_batch_size() -> None:
    """Row r of a batched call equals the same row called alone within the kernel's rounding: the
    weights are the same whatever the batch (no dense fallback for large batches)."""
    torch.manual_seed(0)
    layer = Linear(256, 64, bias=True)
    layer.weight.data.copy_(dense_from(Q.Q4_1)[:, :256])
    quantize_linears(layer, "native")
    assert isinstance(layer.quant, Int4Weight)
    x = torch.randn(300, 256)
    batched = layer(x)
    own = layer.quant.dequantize()
    for r in (0, 17, 299):
        alone = layer(x[r:r + 1])[0]
        ref = x[r] @ own.t() + layer.bias
        bound = 2**-7 * (x[r].abs() @ own.abs().t()) + 1e-5
        assert ((alone - ref).abs() <= bound).all() and ((batched[r] - ref).abs() <= bound).all()


def test_quantization_is_deterministic() -> None:
    dense = dense_from(Q.Q4_K)
    a, b = quantize_weight(dense, "native"), quantize_weight(dense, "native")
    assert isinstance(a, Int4Weight) and isinstance(b, Int4Weight)
    assert torch.equal(a.packed, b.packed) and torch.equal(a.scale_zeros, b.scale_zeros)
