"""The expert store: a packed folder read one expert at a time with single `pread`s.

A pack folder (written by `mixserve pack`, see `experts/pack.py`) holds:

  experts.json    the manifest: model shape, and per expert its format, offset, length and crc32
  experts.bin     every expert as one contiguous blob, each starting at a multiple of ALIGNMENT bytes
                  and padded to one (so O_DIRECT reads of whole blobs are legal)
  config.json, model.safetensors (non-expert weights only), tokenizer files: an ordinary HF folder

Opening checks the manifest field by field and the blob file's size against every entry, so a
truncated pack fails at open with the file and the expert named; a flipped byte fails the expert's
checksum on its first read (or in `verify`). Reads are thread-safe: `read_into` only calls `pread`.
"""

from __future__ import annotations

import json
import mmap
import os
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mixserve.experts.quant import EXPERT_DTYPES, ExpertDtype, Section, blob_layout, blob_nbytes, decode
from mixserve.loading.errors import CheckpointError

MANIFEST = "experts.json"
BLOB_FILE = "experts.bin"
PACK_FORMAT = "mixserve-expert-pack"
PACK_VERSION = 1
ALIGNMENT = 4096
"""Blob offsets and padded lengths are multiples of this (the O_DIRECT block size on Linux)."""


class PackError(CheckpointError):
    """An expert pack is missing, truncated, corrupt or inconsistent (the message names file and field)."""


@dataclass(frozen=True)
class ExpertEntry:
    """Where one expert's blob lives in the blob file."""

    layer_idx: int
    """MoE layer."""
    expert_id: int
    """Expert within the layer."""
    dtype: ExpertDtype
    """Encoding of the blob (see `experts/quant.py`)."""
    offset: int
    """Byte offset in the blob file (a multiple of ALIGNMENT)."""
    nbytes: int
    """Blob length without padding."""
    crc32: int
    """zlib.crc32 of the unpadded blob."""
    layout: tuple[Section, ...]
    """Sections of the blob (derived from `dtype` and the model shape)."""

    @property
    def padded_nbytes(self) -> int:
        return -(-self.nbytes // ALIGNMENT) * ALIGNMENT


def _bytes_view(buf: torch.Tensor, nbytes: int) -> memoryview:
    """A writable memoryview of the first `nbytes` of a uint8 tensor (shares its memory)."""
    return memoryview(buf.numpy()).cast("B")[:nbytes]  # type: ignore[arg-type]


def aligned_buffer(nbytes: int) -> torch.Tensor:
    """`[nbytes]` uint8 on page-aligned anonymous memory (what O_DIRECT reads need)."""
    return torch.frombuffer(mmap.mmap(-1, max(nbytes, 1)), dtype=torch.uint8)[:nbytes]


def _field(data: dict[str, Any], key: str, kind: type, where: Path) -> Any:
    value = data.get(key)
    if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
        raise PackError(f"{where}: field {key!r} is missing or not a {kind.__name__} (got {value!r})")
    return value


class ExpertStore:
    """Read-only access to the experts of one pack folder."""

    def __init__(self, folder: str | Path, *, direct_io: bool = False, verify_checksums: bool = True) -> None:
        self.folder = Path(folder)
        self._fd = -1
        manifest_path = self.folder / MANIFEST
        if not manifest_path.is_file():
            raise PackError(f"{manifest_path}: missing (not an expert pack; create one with `mixserve pack`)")
        try:
            data = json.loads(manifest_path.read_text())
        except (OSError, ValueError) as e:
            raise PackError(f"{manifest_path}: not valid JSON ({e})") from e
        if not isinstance(data, dict) or data.get("format") != PACK_FORMAT:
            raise PackError(f"{manifest_path}: field 'format' must be {PACK_FORMAT!r}")
        if data.get("version") != PACK_VERSION:
            raise PackError(f"{manifest_path}: field 'version' is {data.get('version')!r}; this mixserve "
                            f"reads version {PACK_VERSION}")
        self.manifest = data
        self.architecture: str = _field(data, "architecture", str, manifest_path)
        self.hidden_size: int = _field(data, "hidden_size", int, manifest_path)
        self.intermediate_size: int = _field(data, "intermediate_size", int, manifest_path)
        self.num_experts: int = _field(data, "num_experts", int, manifest_path)
        self.layer_ids: list[int] = [int(i) for i in _field(data, "layer_ids", list, manifest_path)]
        self.blob_path = self.folder / _field(data, "blob_file", str, manifest_path)
        self.entries = self._entries(_field(data, "experts", list, manifest_path), manifest_path)
        self._check_blob_size()
        self.direct_io = direct_io
        self.verify_checksums = verify_checksums
        self._verified: set[tuple[int, int]] = set()
        flags = os.O_RDONLY | (os.O_DIRECT if direct_io else 0)
        try:
            self._fd = os.open(self.blob_path, flags)
        except OSError as e:
            raise PackError(f"{self.blob_path}: cannot open{' with O_DIRECT' if direct_io else ''} ({e})") from e

    def _entries(self, raw: list[Any], where: Path) -> dict[tuple[int, int], ExpertEntry]:
        layouts = {fmt: tuple(blob_layout(fmt, self.hidden_size, self.intermediate_size))
                   for fmt in EXPERT_DTYPES if fmt != "int4" or self._int4_ok()}
        entries: dict[tuple[int, int], ExpertEntry] = {}
        for i, item in enumerate(raw):
            if not isinstance(item, dict):
                raise PackError(f"{where}: experts[{i}] is not an object")
            values = {k: _field(item, k, int, where) for k in ("layer", "expert", "offset", "nbytes", "crc32")}
            dtype = item.get("dtype")
            if dtype not in layouts:
                raise PackError(f"{where}: experts[{i}] field 'dtype' is {dtype!r}; expected one of "
                                f"{', '.join(layouts)}")
            layout = layouts[dtype]
            if values["nbytes"] != blob_nbytes(list(layout)) or values["offset"] % ALIGNMENT:
                raise PackError(f"{where}: experts[{i}] (layer {values['layer']}, expert {values['expert']}) "
                                f"has nbytes={values['nbytes']} offset={values['offset']}, inconsistent with "
                                f"dtype {dtype} and alignment {ALIGNMENT}")
            entries[(values["layer"], values["expert"])] = ExpertEntry(
                values["layer"], values["expert"], dtype, values["offset"], values["nbytes"],
                values["crc32"], layout)
        missing = [(li, e) for li in self.layer_ids for e in range(self.num_experts) if (li, e) not in entries]
        if missing:
            raise PackError(f"{where}: no entry for {len(missing)} expert(s), e.g. layer {missing[0][0]} "
                            f"expert {missing[0][1]}")
        return entries

    def _int4_ok(self) -> bool:
        try:
            blob_layout("int4", self.hidden_size, self.intermediate_size)
            return True
        except ValueError:
            return False

    def _check_blob_size(self) -> None:
        if not self.blob_path.is_file():
            raise PackError(f"{self.blob_path}: missing (the manifest names it as the blob file)")
        size = self.blob_path.stat().st_size
        last = max(self.entries.values(), key=lambda en: en.offset + en.padded_nbytes)
        if last.offset + last.padded_nbytes > size:
            raise PackError(f"{self.blob_path}: truncated: layer {last.layer_idx} expert {last.expert_id} "
                            f"ends at byte {last.offset + last.padded_nbytes}, the file has {size}")

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __del__(self) -> None:
        self.close()

    # ---- reading -------------------------------------------------------------------------------------

    def entry(self, layer_idx: int, expert_id: int) -> ExpertEntry:
        try:
            return self.entries[(layer_idx, expert_id)]
        except KeyError:
            raise KeyError(f"{self.folder}: no expert {expert_id} in layer {layer_idx}") from None

    def max_padded_nbytes(self, layer_idx: int) -> int:
        """Largest padded blob of a layer (the size of a cache slot's read buffer)."""
        return max(self.entry(layer_idx, e).padded_nbytes for e in range(self.num_experts))

    def read_into(self, entry: ExpertEntry, buf: torch.Tensor) -> None:
        """One `pread` of the padded blob into `buf` (`[>= padded_nbytes]` uint8, page-aligned for
        O_DIRECT); checks the crc32 the first time this expert is read, if enabled."""
        n = entry.padded_nbytes
        got = os.preadv(self._fd, [_bytes_view(buf, n)], entry.offset)
        if got < entry.nbytes:
            raise PackError(f"{self.blob_path}: short read of layer {entry.layer_idx} expert "
                            f"{entry.expert_id} ({got} of {entry.nbytes} bytes at offset {entry.offset})")
        key = (entry.layer_idx, entry.expert_id)
        if self.verify_checksums and key not in self._verified:
            self._check(entry, buf)
            self._verified.add(key)

    def _check(self, entry: ExpertEntry, buf: torch.Tensor) -> None:
        crc = zlib.crc32(_bytes_view(buf, entry.nbytes))
        if crc != entry.crc32:
            raise PackError(f"{self.blob_path}: layer {entry.layer_idx} expert {entry.expert_id} fails its "
                            f"checksum (crc32 {crc:08x}, manifest {entry.crc32:08x}); the pack is corrupt, "
                            f"re-create it with `mixserve pack`")

    def read(self, layer_idx: int, expert_id: int) -> torch.Tensor:
        """The raw blob of one expert in a fresh aligned buffer."""
        entry = self.entry(layer_idx, expert_id)
        buf = aligned_buffer(entry.padded_nbytes)
        self.read_into(entry, buf)
        return buf

    def dequantized(self, layer_idx: int, expert_id: int, dtype: torch.dtype
                    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(gate_up, down) of one expert decoded to `dtype`."""
        entry = self.entry(layer_idx, expert_id)
        return decode(self.read(layer_idx, expert_id), list(entry.layout), dtype)

    def verify(self) -> None:
        """Read every expert and check its checksum (raises PackError at the first bad one)."""
        for entry in self.entries.values():
            buf = aligned_buffer(entry.padded_nbytes)
            os.preadv(self._fd, [_bytes_view(buf, entry.padded_nbytes)], entry.offset)
            self._check(entry, buf)

    def total_nbytes(self) -> int:
        """Bytes of all blobs (unpadded): what the experts take on disk."""
        return sum(e.nbytes for e in self.entries.values())
