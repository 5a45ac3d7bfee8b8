"""Reading GGUF files: metadata, tensor table, and tensor data dequantized one tensor at a time.

The header is parsed here rather than with `gguf.GGUFReader`, which builds a numpy view per array
element and takes ~25 s on a 262k-token vocabulary; this parser walks the same bytes in ~0.3 s.
Block sizes come from the `gguf` package; dequantization is in `dequant.py`.

Shapes: GGUF lists dimensions fastest-moving first (`ne0, ne1, ...`); `GGUFTensorInfo.shape` is
the torch order (reversed), so a linear weight is `[out_features, in_features]` as in HF.
"""

from __future__ import annotations

import mmap
import struct
from collections import Counter
from dataclasses import dataclass
from math import prod
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from mixserve.loading.dequant import dequantize_raw
from mixserve.loading.errors import CheckpointError

GGUF_MAGIC = b"GGUF"
_Q = GGMLQuantizationType

SUPPORTED_TYPES: frozenset[GGMLQuantizationType] = frozenset({
    _Q.F32, _Q.F16, _Q.BF16, _Q.Q4_0, _Q.Q4_1, _Q.Q5_0, _Q.Q5_1, _Q.Q8_0,
    _Q.Q2_K, _Q.Q3_K, _Q.Q4_K, _Q.Q5_K, _Q.Q6_K,
})
"""Tensor types mixserve dequantizes (each is covered by a reference test)."""

# GGUF metadata value types -> struct format of one scalar.
_SCALAR_FORMATS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_NUMPY_DTYPES = {0: np.uint8, 1: np.int8, 2: np.uint16, 3: np.int16, 4: np.uint32, 5: np.int32,
                 6: np.float32, 7: np.bool_, 10: np.uint64, 11: np.int64, 12: np.float64}
_STRING, _ARRAY = 8, 9


@dataclass(frozen=True)
class GGUFTensorInfo:
    """One entry of the tensor table."""

    name: str
    ggml_type: GGMLQuantizationType
    shape: tuple[int, ...]
    """Torch order, slowest dimension first (GGUF's `ne` reversed)."""
    offset: int
    """Absolute byte offset of the data in the file."""
    n_bytes: int


class _Cursor:
    """Little-endian reads from a buffer, advancing a position."""

    def __init__(self, buf: mmap.mmap, pos: int = 0) -> None:
        self.buf, self.pos = buf, pos

    def scalar(self, fmt: str) -> Any:
        (value,) = struct.unpack_from("<" + fmt, self.buf, self.pos)
        self.pos += struct.calcsize(fmt)
        return value

    def string(self) -> str:
        n = self.scalar("Q")
        if self.pos + n > len(self.buf):
            raise EOFError(f"string of {n} bytes at offset {self.pos} runs past the end")
        raw = self.buf[self.pos:self.pos + n]
        self.pos += n
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            return raw.decode("utf-8", errors="replace")

    def value(self, value_type: int) -> Any:
        if value_type in _SCALAR_FORMATS:
            return self.scalar(_SCALAR_FORMATS[value_type])
        if value_type == _STRING:
            return self.string()
        if value_type == _ARRAY:
            element_type, count = self.scalar("I"), self.scalar("Q")
            if element_type == _STRING:
                return [self.string() for _ in range(count)]
            if element_type in _NUMPY_DTYPES:
                dtype = np.dtype(_NUMPY_DTYPES[element_type]).newbyteorder("<")
                arr = np.frombuffer(self.buf, dtype=dtype, count=count, offset=self.pos).copy()
                self.pos += count * dtype.itemsize
                return arr
            return [self.value(element_type) for _ in range(count)]
        raise ValueError(f"unknown metadata value type {value_type}")


class GGUFFile:
    """An open GGUF file: `metadata` (key -> value), `tensors` (name -> info), data memory-mapped.

    Numeric metadata arrays are numpy arrays, string arrays are `list[str]`.
    Raises CheckpointError naming the file for a missing, truncated or malformed file.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        try:
            with self.path.open("rb") as f:
                self._buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except (OSError, ValueError) as e:  # ValueError: mmap of an empty file
            raise CheckpointError(f"{self.path}: cannot open GGUF file ({e})") from e
        try:
            self._parse()
        except CheckpointError:
            raise
        except (struct.error, EOFError, ValueError, IndexError, OverflowError, MemoryError) as e:
            raise CheckpointError(f"{self.path}: truncated or corrupt GGUF header ({e})") from e

    def _parse(self) -> None:
        cur = _Cursor(self._buf)
        if self._buf[:4] != GGUF_MAGIC:
            raise CheckpointError(f"{self.path}: not a GGUF file (magic {self._buf[:4]!r}, expected b'GGUF')")
        cur.pos = 4
        self.version: int = cur.scalar("I")
        if self.version not in (2, 3):
            swapped = int.from_bytes(self.version.to_bytes(4, "little"), "big")
            kind = "a big-endian GGUF" if swapped in (2, 3) else f"GGUF version {self.version}"
            raise CheckpointError(f"{self.path}: {kind} is not supported (little-endian v2 and v3 are)")
        num_tensors, num_kv = cur.scalar("Q"), cur.scalar("Q")
        if num_tensors > len(self._buf) or num_kv > len(self._buf):
            raise CheckpointError(f"{self.path}: corrupt GGUF header (counts {num_tensors}, {num_kv})")
        self.metadata: dict[str, Any] = {}
        for _ in range(num_kv):
            key = cur.string()
            self.metadata[key] = cur.value(cur.scalar("I"))
        raw_infos = []
        for _ in range(num_tensors):
            name = cur.string()
            dims = [cur.scalar("Q") for _ in range(cur.scalar("I"))]
            raw_infos.append((name, dims, cur.scalar("I"), cur.scalar("Q")))
        alignment = int(self.metadata.get("general.alignment", 32))
        data_start = -(-cur.pos // alignment) * alignment
        self.tensors: dict[str, GGUFTensorInfo] = {}
        for name, dims, type_id, offset in raw_infos:
            self.tensors[name] = self._tensor_info(name, dims, type_id, data_start + offset)

    def _tensor_info(self, name: str, dims: list[int], type_id: int, offset: int) -> GGUFTensorInfo:
        try:
            ggml_type = GGMLQuantizationType(type_id)
        except ValueError:
            raise CheckpointError(f"{self.path}: tensor {name!r} has unknown ggml type {type_id}") from None
        block_size, type_size = GGML_QUANT_SIZES[ggml_type]
        if dims and dims[0] % block_size:
            raise CheckpointError(f"{self.path}: tensor {name!r} row length {dims[0]} is not a multiple of "
                                  f"the {ggml_type.name} block size {block_size}")
        n_bytes = prod(dims) // block_size * type_size
        if offset + n_bytes > len(self._buf):
            raise CheckpointError(
                f"{self.path}: truncated GGUF: tensor {name!r} needs bytes up to {offset + n_bytes}, "
                f"file has {len(self._buf)}")
        return GGUFTensorInfo(name, ggml_type, tuple(reversed(dims)), offset, n_bytes)

    @property
    def architecture(self) -> str:
        arch = self.metadata.get("general.architecture")
        if not isinstance(arch, str):
            raise CheckpointError(f"{self.path}: GGUF metadata has no 'general.architecture'")
        return arch

    def type_histogram(self) -> dict[str, int]:
        """Tensor type name -> number of tensors of that type."""
        return dict(Counter(t.ggml_type.name for t in self.tensors.values()))

    def check_supported(self) -> None:
        """Raise CheckpointError listing the tensors whose types cannot be dequantized."""
        bad = {n: t.ggml_type.name for n, t in self.tensors.items() if t.ggml_type not in SUPPORTED_TYPES}
        if bad:
            shown = ", ".join(f"{n} ({t})" for n, t in list(bad.items())[:5])
            raise CheckpointError(
                f"{self.path}: unsupported GGUF tensor type(s) {sorted(set(bad.values()))} in {len(bad)} "
                f"tensor(s), e.g. {shown}; supported: {sorted(t.name for t in SUPPORTED_TYPES)}")

    def raw(self, name: str) -> np.ndarray:
        """The stored bytes of tensor `name` as a read-only uint8 view `[*shape[:-1], row_bytes]`."""
        info = self.tensors[name]
        row_bytes = info.n_bytes // max(1, prod(info.shape[:-1]))
        data = np.frombuffer(self._buf, dtype=np.uint8, count=info.n_bytes, offset=info.offset)
        return data.reshape(*info.shape[:-1], row_bytes)

    def dequantize(self, name: str, index: int | None = None) -> torch.Tensor:
        """Tensor `name` as float32 (bfloat16 if stored as BF16), in torch shape order.

        `index` selects one slice along the first dimension (one expert of a stacked
        `[num_experts, ...]` tensor) without dequantizing the others.
        """
        info = self.tensors[name]
        if info.ggml_type not in SUPPORTED_TYPES:
            raise CheckpointError(f"{self.path}: tensor {name!r} has unsupported type {info.ggml_type.name}")
        raw, shape = self.raw(name), info.shape
        if index is not None:
            raw, shape = raw[index], shape[1:]
        return dequantize_raw(raw, info.ggml_type).reshape(shape)

