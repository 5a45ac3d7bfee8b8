"""Expert encodings: plain formats are exact, int8/int4 are close and deterministic, layouts aligned."""

from __future__ import annotations

import pytest
import torch

from mixserve.experts.quant import (
    EXPERT_DTYPES,
    SECTION_ALIGN,
    blob_layout,
    blob_nbytes,
    decode,
    decoded_nbytes,
    encode,
)

HIDDEN, INTER = 64, 96


def blob_tensor(blob: bytes) -> torch.Tensor:
    return torch.frombuffer(bytearray(blob), dtype=torch.uint8)


@pytest.mark.parametrize("fmt", EXPERT_DTYPES)
def test_roundtrip(fmt: str) -> None:
    torch.manual_seed(0)
    gate_up, down = torch.randn(2 * INTER, HIDDEN), torch.randn(HIDDEN, INTER)
    blob = encode(fmt, gate_up, down)  # type: ignore[arg-type]
    layout = blob_layout(fmt, HIDDEN, INTER)  # type: ignore[arg-type]
    assert len(blob) == blob_nbytes(layout) and all(s.offset % SECTION_ALIGN == 0 for s in layout)
    gu, dn = decode(blob_tensor(blob), layout, torch.float32)
    assert gu.shape == gate_up.shape and dn.shape == down.shape and gu.dtype == torch.float32
    tol = {"float32": 0.0, "bfloat16": 0.01, "float16": 1e-3, "int8": 0.01, "int4": 0.2}[fmt]
    for got, want in ((gu, gate_up), (dn, down)):
        err = (got - want).abs().max() / want.abs().max()
        assert err <= tol, (fmt, float(err))
    again = decode(blob_tensor(blob), layout, torch.float32)
    assert torch.equal(again[0], gu) and torch.equal(again[1], dn)  # deterministic
    assert decoded_nbytes(layout, torch.float32) == (0 if fmt == "float32" else (gu.numel() + dn.numel()) * 4)


def test_plain_same_dtype_is_a_view() -> None:
    gate_up, down = torch.randn(2 * INTER, HIDDEN).bfloat16(), torch.randn(HIDDEN, INTER).bfloat16()
    raw = blob_tensor(encode("bfloat16", gate_up, down))
    gu, dn = decode(raw, blob_layout("bfloat16", HIDDEN, INTER), torch.bfloat16)
    assert gu.data_ptr() == raw.data_ptr() and torch.equal(gu, gate_up) and torch.equal(dn, down)


def test_int4_is_packed_small() -> None:
    assert blob_nbytes(blob_layout("int4", HIDDEN, INTER)) < blob_nbytes(blob_layout("bfloat16", HIDDEN, INTER)) / 3
    with pytest.raises(ValueError, match="divisible by 32"):
        blob_layout("int4", 48, 96)
    with pytest.raises(ValueError, match="unknown expert dtype 'fp8'"):
        blob_layout("fp8", HIDDEN, INTER)  # type: ignore[arg-type]
