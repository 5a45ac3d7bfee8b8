"""Reading HF safetensors checkpoints: one file or shards listed in `model.safetensors.index.json`.

Tensors are read lazily through `safetensors.safe_open` (memory-mapped), one at a time, in the
dtype stored. Every shard's header is parsed and checked against its file size when the source is
opened, so a truncated or corrupt shard fails at load time with the file named, not mid-model.
"""

from __future__ import annotations

import json
import struct
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from mixserve.loading.errors import CheckpointError

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


def _read_header(path: Path) -> dict[str, Any]:
    """The JSON header of one safetensors file, checked for size and offsets."""
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{path}: truncated safetensors file ({size} bytes)")
            (n,) = struct.unpack("<Q", head)
            if n > size - 8:
                raise CheckpointError(f"{path}: corrupt safetensors header (length {n} > file size {size})")
            header = json.loads(f.read(n))
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read ({e})") from e
    except (ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: corrupt safetensors header ({e})") from e
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header (not a JSON object)")
    data_size = size - 8 - n
    for name, info in header.items():
        if name == "__metadata__":
            continue
        end = info.get("data_offsets", [0, 0])[1] if isinstance(info, dict) else None
        if not isinstance(end, int) or end > data_size:
            raise CheckpointError(f"{path}: truncated safetensors file: tensor {name!r} ends at byte {end}, "
                                  f"data section has {data_size}")
    return header


class SafetensorsSource:
    """HF-named tensors of a model folder, read lazily from its safetensors file(s)."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        self._shard_of = self._tensor_shards()
        self._dtypes: dict[str, str] = {}
        for shard in sorted(set(self._shard_of.values())):
            header = _read_header(self.folder / shard)
            for name, info in header.items():
                if name != "__metadata__":
                    self._dtypes[name] = info.get("dtype", "?")
        missing = [n for n in self._shard_of if n not in self._dtypes]
        if missing:
            raise CheckpointError(f"{self.folder / INDEX_FILE}: lists tensors its shards lack: {missing[:5]}")

    def _tensor_shards(self) -> dict[str, str]:
        """Tensor name -> shard file name, from the index or from the single file / all files."""
        index = self.folder / INDEX_FILE
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (OSError, ValueError, KeyError, TypeError) as e:
                raise CheckpointError(f"{index}: not a valid safetensors index ({e})") from e
            for shard in sorted(set(weight_map.values())):
                if not (self.folder / shard).is_file():
                    raise CheckpointError(f"{index}: shard {shard!r} is missing from {self.folder}")
            return dict(weight_map)
        files = [self.folder / SINGLE_FILE] if (self.folder / SINGLE_FILE).is_file() \
            else sorted(self.folder.glob("*.safetensors"))
        if not files:
            raise CheckpointError(f"{self.folder}: no *.safetensors weights (mixserve reads safetensors or "
                                  f"GGUF; re-save .bin/.pt checkpoints with save_pretrained)")
        out: dict[str, str] = {}
        for f in files:
            out.update((name, f.name) for name in _read_header(f) if name != "__metadata__")
        return out

    @property
    def names(self) -> list[str]:
        return list(self._shard_of)

    def dtype_histogram(self) -> dict[str, int]:
        return dict(Counter(self._dtypes.values()))

    def iter_tensors(self, names: Sequence[str] | None = None) -> Iterator[tuple[str, torch.Tensor]]:
        """(name, tensor) for `names` (default: all), opening each shard once, in shard order."""
        wanted = list(self._shard_of) if names is None else list(names)
        unknown = [n for n in wanted if n not in self._shard_of]
        if unknown:
            raise KeyError(f"{self.folder}: no tensors named {unknown[:5]}")
        by_shard: dict[str, list[str]] = {}
        for n in wanted:
            by_shard.setdefault(self._shard_of[n], []).append(n)
        for shard, shard_names in by_shard.items():
            path = self.folder / shard
            try:
                with safe_open(str(path), framework="pt") as f:
                    for n in shard_names:
                        yield n, f.get_tensor(n)
            except Exception as e:  # safetensors raises its own SafetensorError (an Exception)
                raise CheckpointError(f"{path}: cannot read tensors ({e})") from e
