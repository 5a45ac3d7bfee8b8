"""Dequantizing GGUF blocks to torch tensors.

The simple 32-element block formats (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0) are unpacked here with
vectorized numpy: `gguf.quants.dequantize` gives the same bits but takes 2-5x longer (~7 s on
gemma3's 262k x 640 Q8_0 embedding). Everything else goes through `gguf.quants.dequantize`.
Tests check both paths against `gguf.quants` bit for bit.

Block layouts (ggml-common.h): `d` and `m` are float16; `qs` packs two 4-bit values per byte, low
nibbles are elements 0..15 and high nibbles 16..31; `qh` holds the fifth bit of element j at bit j.
"""

from __future__ import annotations

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf.quants import dequantize as gguf_dequantize

_Q = GGMLQuantizationType


def dequantize_raw(raw: np.ndarray, ggml_type: GGMLQuantizationType) -> torch.Tensor:
    """uint8 blocks `[..., row_bytes]` -> float32 `[..., row_elements]` (bfloat16 stays bfloat16)."""
    if ggml_type == _Q.BF16:
        return torch.from_numpy(raw.copy().view(np.int16)).view(torch.bfloat16)
    if ggml_type == _Q.F32:
        return torch.from_numpy(raw.copy().view(np.float32))
    if ggml_type == _Q.F16:
        return torch.from_numpy(raw.view(np.float16).astype(np.float32))
    unpack = _UNPACK.get(ggml_type)
    if unpack is None:
        return torch.from_numpy(np.ascontiguousarray(gguf_dequantize(raw, ggml_type), dtype=np.float32))
    block_size, type_size = GGML_QUANT_SIZES[ggml_type]
    blocks = raw.reshape(-1, type_size)
    out = unpack(blocks).reshape(*raw.shape[:-1], raw.shape[-1] // type_size * block_size)
    return torch.from_numpy(np.ascontiguousarray(out))


# numpy rather than torch: these ops are memory-bound, and numpy stays single-threaded, which is as
# fast as torch's best here and never stalls when the cores are oversubscribed (torch's 2-thread
# elementwise kernels ran 20-50x slower on a loaded 2-core machine).

def _half(blocks: np.ndarray, start: int) -> np.ndarray:
    """`[num_blocks, 1]` float32 from the float16 at byte `start` of each block."""
    return blocks[:, start:start + 2].copy().view(np.float16).astype(np.float32)


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """`[num_blocks, 16]` packed bytes -> `[num_blocks, 32]` values 0..15 (low nibbles first)."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=1)


def _fifth_bits(qh: np.ndarray) -> np.ndarray:
    """`[num_blocks, 4]` bytes of a little-endian uint32 -> `[num_blocks, 32]`, bit j as 0 or 16."""
    return np.unpackbits(qh, axis=1, bitorder="little") << 4


def _q8_0(blocks: np.ndarray) -> np.ndarray:
    return blocks[:, 2:].view(np.int8).astype(np.float32) * _half(blocks, 0)


def _q4_0(blocks: np.ndarray) -> np.ndarray:
    return (_nibbles(blocks[:, 2:]).astype(np.float32) - 8.0) * _half(blocks, 0)


def _q4_1(blocks: np.ndarray) -> np.ndarray:
    return _nibbles(blocks[:, 4:]).astype(np.float32) * _half(blocks, 0) + _half(blocks, 2)


def _q5_0(blocks: np.ndarray) -> np.ndarray:
    q = _nibbles(blocks[:, 6:]) | _fifth_bits(blocks[:, 2:6])
    return (q.astype(np.float32) - 16.0) * _half(blocks, 0)


def _q5_1(blocks: np.ndarray) -> np.ndarray:
    q = _nibbles(blocks[:, 8:]) | _fifth_bits(blocks[:, 4:8])
    return q.astype(np.float32) * _half(blocks, 0) + _half(blocks, 2)


_UNPACK = {_Q.Q8_0: _q8_0, _Q.Q4_0: _q4_0, _Q.Q4_1: _q4_1, _Q.Q5_0: _q5_0, _Q.Q5_1: _q5_1}
