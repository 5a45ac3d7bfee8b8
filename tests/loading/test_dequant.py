"""Dequantization of every supported GGUF tensor type against independent references.

- numpy-unpacked types (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0): bit-exact vs `gguf.quants.dequantize`, and a
  quantize -> dequantize round trip of random data stays within the format's error bound.
- K-quants (gguf has no quantizer for them): `gguf.quants.dequantize` vs transformers' independent
  torch implementation on random well-formed blocks.
- Real files: every type present in the embedded models vs transformers' dequantizer.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf.quants import dequantize as gguf_dequantize
from gguf.quants import quantize as gguf_quantize

from mixserve.loading.dequant import dequantize_raw
from mixserve.loading.gguf_io import SUPPORTED_TYPES, GGUFFile

Q = GGMLQuantizationType
ROUND_TRIP_TYPES = [Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1]
# Worst-case absolute error per element for N(0,1) data, a loose bound per format.
MAX_ERR = {Q.F32: 0.0, Q.F16: 2e-3, Q.BF16: 2e-2, Q.Q8_0: 3e-2, Q.Q4_0: 0.6, Q.Q4_1: 0.45,
           Q.Q5_0: 0.3, Q.Q5_1: 0.25}
K_TYPES = [Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K]
# Byte offsets of the float16 super-block scales (d, dmin) in each K block.
K_HALF_OFFSETS = {Q.Q2_K: (80, 82), Q.Q3_K: (108,), Q.Q4_K: (0, 2), Q.Q5_K: (0, 2), Q.Q6_K: (208,)}


def random_blocks(qtype: GGMLQuantizationType, rows: int, cols: int, seed: int = 0) -> np.ndarray:
    """Random bytes shaped `[rows, row_bytes]` with every float16 scale set to a sane value."""
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, size=(rows * cols // block_size, type_size), dtype=np.uint8)
    offsets = K_HALF_OFFSETS.get(qtype, (0, 2) if qtype in (Q.Q4_1, Q.Q5_1) else (0,))
    for off in offsets:
        scales = np.asarray(rng.uniform(0.001, 0.05, size=raw.shape[0]), dtype=np.float16)
        raw[:, off:off + 2] = scales.view(np.uint8).reshape(-1, 2)
    return raw.reshape(rows, -1)


@pytest.mark.parametrize("qtype", ROUND_TRIP_TYPES, ids=lambda q: q.name)
def test_round_trip_error_is_small(qtype: GGMLQuantizationType) -> None:
    x = np.random.default_rng(1).standard_normal((8, 512)).astype(np.float32)
    packed = gguf_quantize(x, qtype)
    raw = np.ascontiguousarray(packed).view(np.uint8).reshape(8, -1)
    y = dequantize_raw(raw, qtype).float().numpy()
    assert y.shape == x.shape
    assert np.abs(y - x).max() <= MAX_ERR[qtype]


@pytest.mark.parametrize("qtype", [Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.F16, Q.BF16],
                         ids=lambda q: q.name)
def test_bit_exact_vs_gguf(qtype: GGMLQuantizationType) -> None:
    if qtype in (Q.F16, Q.BF16):
        x = np.random.default_rng(2).standard_normal((16, 256)).astype(np.float32)
        raw = np.ascontiguousarray(gguf_quantize(x, qtype)).view(np.uint8).reshape(16, -1)
    else:
        raw = random_blocks(qtype, 16, 256)
    ours = dequantize_raw(raw, qtype).float().numpy()
    ref = gguf_dequantize(raw, qtype).astype(np.float32)
    np.testing.assert_array_equal(ours, ref)


@pytest.mark.parametrize("qtype", K_TYPES, ids=lambda q: q.name)
def test_k_quants_match_transformers(qtype: GGMLQuantizationType) -> None:
    from transformers.integrations.gguf.dequant import dequantize as hf_dequantize

    raw = random_blocks(qtype, 4, 512, seed=3)
    ours = dequantize_raw(raw, qtype)
    ref = hf_dequantize(torch.from_numpy(raw.reshape(-1).copy()), int(qtype)).reshape(4, 512)
    assert ours.dtype == torch.float32 and ours.shape == (4, 512)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)


def test_supported_set_is_covered() -> None:
    covered = set(ROUND_TRIP_TYPES) | set(K_TYPES)
    assert SUPPORTED_TYPES == covered


def test_bf16_stays_bf16() -> None:
    x = torch.randn(4, 64).to(torch.bfloat16)
    raw = x.view(torch.int16).numpy().view(np.uint8)
    y = dequantize_raw(raw, Q.BF16)
    assert y.dtype == torch.bfloat16 and torch.equal(y, x)


def test_stacked_slice_equals_full_tensor_slice() -> None:
    raw = random_blocks(Q.Q4_K, 3 * 8, 256, seed=4).reshape(3, 8, -1)
    full = dequantize_raw(raw, Q.Q4_K)
    assert full.shape == (3, 8, 256)
    torch.testing.assert_close(dequantize_raw(raw[1], Q.Q4_K), full[1], rtol=0, atol=0)


@pytest.mark.parametrize("model", ["smollm2", "gemma3"])
def test_real_file_types_match_transformers(model: str, request: pytest.FixtureRequest) -> None:
    """One tensor of every quantized type in each embedded file, vs transformers' dequantizer
    (Q5_0 is not in transformers': checked bit-exact against gguf.quants instead)."""
    from transformers.integrations.gguf.dequant import GGML_BLOCK
    from transformers.integrations.gguf.dequant import dequantize as hf_dequantize

    gguf = GGUFFile(request.getfixturevalue(f"{model}_gguf"))
    seen: set[GGMLQuantizationType] = set()
    for name, info in gguf.tensors.items():
        if info.ggml_type in seen or name == "token_embd.weight":
            continue
        seen.add(info.ggml_type)
        ours = gguf.dequantize(name)
        assert ours.shape == info.shape
        raw = gguf.raw(name)
        if int(info.ggml_type) in GGML_BLOCK:
            flat = torch.from_numpy(raw.reshape(-1).copy())
            ref = hf_dequantize(flat, int(info.ggml_type)).reshape(info.shape)
            torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)
        else:
            ref = torch.from_numpy(gguf_dequantize(raw, info.ggml_type).astype(np.float32))
            ref = ref.reshape(info.shape)
            assert torch.equal(ours, ref), info.ggml_type.name
    expected = {"smollm2": {Q.F32, Q.Q4_1}, "gemma3": {Q.F32, Q.Q5_0, Q.Q4_K, Q.Q6_K, Q.Q8_0}}[model]
    assert expected <= seen
