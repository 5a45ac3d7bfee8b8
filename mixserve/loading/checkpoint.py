"""`load_checkpoint`: one entry point for HF safetensors folders and GGUF files.

Either way the result is a `Checkpoint`: an HF-style config dict, HF-named tensors produced lazily
(`weights()`), the tokenizer, the generation stop ids and what quantization the file used. Model
families (`mixserve.models`) only ever see HF names and HF configs.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np
import torch

from mixserve.loading.errors import CheckpointError
from mixserve.loading.gguf_config import gguf_hf_config
from mixserve.loading.gguf_families import spec_for
from mixserve.loading.gguf_io import GGUF_MAGIC, GGUFFile
from mixserve.loading.gguf_names import Fix, PlannedTensor, weight_plan
from mixserve.loading.gguf_tokenizer import gguf_tokenizer
from mixserve.loading.safetensors_io import SafetensorsSource
from mixserve.loading.tokenizer import Tokenizer, load_hf_tokenizer

__all__ = ["Checkpoint", "CheckpointError", "GGUFSource", "QuantizationInfo", "WeightSource",
           "load_checkpoint", "open_weights", "unpermute_rope"]


class WeightSource(Protocol):
    """Where a checkpoint's tensors come from."""

    @property
    def names(self) -> list[str]:
        """Every HF tensor name, in file order."""
        ...

    def iter_tensors(self, names: Sequence[str] | None = None) -> Iterator[tuple[str, torch.Tensor]]:
        """(HF name, tensor) for `names` (default: all), read one at a time."""
        ...


@dataclass(frozen=True)
class QuantizationInfo:
    """How the stored weights are encoded."""

    method: str
    """`gguf` for GGUF files, `none` for plain safetensors."""
    file_type: str | None
    """GGUF `general.file_type` as llama.cpp names it (e.g. "MOSTLY_Q4_1"), else the dominant dtype."""
    tensor_types: dict[str, int]
    """Stored type (GGUF type name or safetensors dtype) -> number of tensors."""


@dataclass(frozen=True)
class Checkpoint:
    """A loaded checkpoint: config, tokenizer and a lazy supply of HF-named tensors."""

    path: Path
    """The GGUF file or the HF folder."""
    format: Literal["hf", "gguf"]
    hf_config: dict[str, Any]
    """HF-style config (as config.json / transformers' config class would have it)."""
    tokenizer: Tokenizer
    eos_token_ids: tuple[int, ...]
    """Generation stop ids: the model's EOS first, then chat end-of-turn markers."""
    generation_config: dict[str, Any]
    """generation_config.json (HF) or its GGUF equivalent (bos/eos ids)."""
    quantization: QuantizationInfo
    source: WeightSource = field(repr=False, compare=False)

    @property
    def architecture(self) -> str:
        return str((self.hf_config.get("architectures") or ["?"])[0])

    @property
    def weight_names(self) -> list[str]:
        return self.source.names

    def weights(self, names: Sequence[str] | None = None, dtype: torch.dtype | None = None
                ) -> Iterator[tuple[str, torch.Tensor]]:
        """(HF name, tensor) pairs, produced one at a time; stored dtype (GGUF: float32, or
        bfloat16 for BF16 tensors) unless `dtype` is given."""
        for name, tensor in self.source.iter_tensors(names):
            yield name, (tensor if dtype is None else tensor.to(dtype))


def load_checkpoint(path: str | Path, *, tokenizer_path: str | Path | None = None) -> Checkpoint:
    """Open an HF model folder (config.json + safetensors) or a GGUF file.

    A folder holding no config.json but exactly one .gguf file loads that file. `tokenizer_path`
    takes the tokenizer from another HF folder or GGUF file (e.g. for a random test model saved
    without one). Raises CheckpointError naming the file and the problem.
    """
    path = _resolve(path)
    if path.is_dir():
        return _load_hf(path, tokenizer_path)
    return _load_gguf(path, tokenizer_path)


def open_weights(path: str | Path) -> tuple[dict[str, Any], WeightSource]:
    """Just the HF config and the lazy tensors of a checkpoint: no tokenizer needed or built."""
    path = _resolve(path)
    if path.is_dir():
        return _read_config(path / "config.json"), SafetensorsSource(path)
    gguf = _open_gguf(path)
    config, source = _gguf_config_and_source(gguf)
    return config, source


def _resolve(path: str | Path) -> Path:
    """The folder or GGUF file to load (raises for anything else)."""
    path = Path(path).expanduser()
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or folder")
    if path.is_dir() and not (path / "config.json").is_file():
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return ggufs[0]
        if ggufs:
            raise CheckpointError(f"{path}: several GGUF files ({[g.name for g in ggufs]}); pass one of them")
        raise CheckpointError(f"{path}: folder has no config.json (and no .gguf file)")
    if path.is_dir():
        return path
    with path.open("rb") as f:
        magic = f.read(4)
    if magic == GGUF_MAGIC:
        return path
    if path.suffix == ".safetensors":
        raise CheckpointError(f"{path}: a lone .safetensors file has no config; pass its model folder")
    raise CheckpointError(f"{path}: neither a GGUF file (magic {magic!r}) nor an HF model folder")


def _read_config(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise CheckpointError(f"{path}: missing")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(config, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return config


def _tokenizer_from(path: Path) -> Tokenizer:
    path = path.expanduser()
    if not path.exists():
        raise CheckpointError(f"{path}: tokenizer path does not exist")
    return gguf_tokenizer(_open_gguf(path)) if path.is_file() else load_hf_tokenizer(path)


def _load_hf(folder: Path, tokenizer_path: str | Path | None) -> Checkpoint:
    config = _read_config(folder / "config.json")
    quant = config.get("quantization_config")
    if quant:
        method = quant.get("quant_method", "?") if isinstance(quant, dict) else "?"
        raise CheckpointError(f"{folder / 'config.json'}: quantized HF checkpoints ({method}) are not "
                              f"supported; use the unquantized safetensors or a GGUF file")
    source = SafetensorsSource(folder)
    tokenizer = _tokenizer_from(Path(tokenizer_path) if tokenizer_path is not None else folder)
    gen_path = folder / "generation_config.json"
    gen_config = _read_config(gen_path) if gen_path.is_file() else {}
    dtypes = source.dtype_histogram()
    main_dtype = max(dtypes, key=dtypes.__getitem__, default=None)
    return Checkpoint(path=folder, format="hf", hf_config=config, tokenizer=tokenizer,
                      eos_token_ids=tuple(tokenizer.eos_token_ids), generation_config=gen_config,
                      quantization=QuantizationInfo("none", main_dtype, dtypes), source=source)


_FILE_TYPES = {0: "ALL_F32", 1: "MOSTLY_F16", 2: "MOSTLY_Q4_0", 3: "MOSTLY_Q4_1", 7: "MOSTLY_Q8_0",
               8: "MOSTLY_Q5_0", 9: "MOSTLY_Q5_1", 10: "MOSTLY_Q2_K", 11: "MOSTLY_Q3_K_S",
               12: "MOSTLY_Q3_K_M", 13: "MOSTLY_Q3_K_L", 14: "MOSTLY_Q4_K_S", 15: "MOSTLY_Q4_K_M",
               16: "MOSTLY_Q5_K_S", 17: "MOSTLY_Q5_K_M", 18: "MOSTLY_Q6_K", 32: "MOSTLY_BF16"}


def _open_gguf(path: Path) -> GGUFFile:
    gguf = GGUFFile(path)
    gguf.check_supported()
    return gguf


def _gguf_config_and_source(gguf: GGUFFile) -> tuple[dict[str, Any], GGUFSource]:
    arch = gguf.architecture
    spec = spec_for(gguf.path, arch, gguf.metadata)
    shapes = {name: info.shape for name, info in gguf.tensors.items()}
    config = gguf_hf_config(gguf.path, arch, spec, gguf.metadata, shapes)
    return config, GGUFSource(gguf, weight_plan(gguf.path, spec, shapes), config)


def _load_gguf(path: Path, tokenizer_path: str | Path | None) -> Checkpoint:
    gguf = _open_gguf(path)
    config, source = _gguf_config_and_source(gguf)
    tokenizer = gguf_tokenizer(gguf) if tokenizer_path is None else _tokenizer_from(Path(tokenizer_path))
    eos = list(tokenizer.eos_token_ids)
    file_type = gguf.metadata.get("general.file_type")
    return Checkpoint(
        path=path, format="gguf", hf_config=config, tokenizer=tokenizer, eos_token_ids=tuple(eos),
        generation_config={"bos_token_id": config.get("bos_token_id"), "eos_token_id": eos},
        quantization=QuantizationInfo("gguf", _FILE_TYPES.get(int(file_type), str(file_type))
                                      if file_type is not None else None, gguf.type_histogram()),
        source=source)


class GGUFSource:
    """HF-named tensors of a GGUF file: dequantized one at a time, llama.cpp's changes undone."""

    def __init__(self, gguf: GGUFFile, plan: list[PlannedTensor], hf_config: dict[str, Any]) -> None:
        self.gguf = gguf
        self._plan = {p.hf_name: p for p in plan}
        self._num_heads = int(hf_config["num_attention_heads"])
        self._num_kv_heads = int(hf_config["num_key_value_heads"])

    @property
    def names(self) -> list[str]:
        return list(self._plan)

    def iter_tensors(self, names: Sequence[str] | None = None) -> Iterator[tuple[str, torch.Tensor]]:
        wanted = list(self._plan) if names is None else list(names)
        unknown = [n for n in wanted if n not in self._plan]
        if unknown:
            raise KeyError(f"{self.gguf.path}: no tensors named {unknown[:5]}")
        for name in wanted:
            planned = self._plan[name]
            yield name, self._fixed(self.gguf.dequantize(planned.gguf_name, planned.expert), planned.fix)

    def _fixed(self, w: torch.Tensor, fix: Fix) -> torch.Tensor:
        if fix is Fix.UNPERMUTE_Q or fix is Fix.UNPERMUTE_K:
            return unpermute_rope(w, self._num_heads if fix is Fix.UNPERMUTE_Q else self._num_kv_heads)
        if fix is Fix.MINUS_ONE:
            if w.dtype == torch.float32:
                return torch.from_numpy(w.numpy() - np.float32(1.0))
            return (w.float() - 1.0).to(w.dtype)
        if fix is Fix.UNSQUEEZE0:
            return w.unsqueeze(0)
        return w


def unpermute_rope(w: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Inverse of llama.cpp's q/k permute: per head, rows `[x0, y0, x1, y1, ...]` -> `[x..., y...]`.

    `[num_heads * head_dim, ...]` in and out (a bias `[num_heads * head_dim]` works too). The copy
    runs in numpy: single-threaded, so it never stalls on oversubscribed cores as torch's can.
    """
    bf16 = w.dtype == torch.bfloat16
    arr = (w.view(torch.int16) if bf16 else w).numpy()
    head_dim = arr.shape[0] // num_heads
    out = torch.from_numpy(np.ascontiguousarray(
        arr.reshape(num_heads, head_dim // 2, 2, *arr.shape[1:]).swapaxes(1, 2).reshape(arr.shape)))
    return out.view(torch.bfloat16) if bf16 else out
