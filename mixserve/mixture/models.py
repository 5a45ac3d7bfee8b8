"""Expert model specs (name -> checkpoint + engine options), the models file, and the engine loader.

A models file is JSON: `{"models": [{"name": "math", "model": "/path/or/known-name", "max_model_len": 1024,
"kv_cache_mib": 64, "dtype": "float32", "weight_format": "auto"}, ...]}` (only `name` and `model` required).
"""

from __future__ import annotations

import gc
import json
import os
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mixserve.config import CacheConfig, ConfigError, EngineConfig, ModelConfig, SchedulerConfig
from mixserve.mixture.pool import LoadResult

if TYPE_CHECKING:
    import torch

    from mixserve.llm import LLM


@dataclass(frozen=True)
class ModelSpec:
    """One servable model of a pool."""

    name: str
    """What clients send as `model` and what profiles are keyed by."""
    model: str
    """Known model name (`mixserve models`) or a path to an HF folder or a .gguf file."""
    max_model_len: int = 1024
    """Context cap of this model's engine (keeps its KV cache small)."""
    kv_cache_mib: int = 64
    """KV cache of this model's engine (MiB); counted in the pool's resident bytes."""
    dtype: str = "float32"
    """Activation dtype: float32 or bfloat16."""
    weight_format: str = "auto"
    """auto, dense or int8 (see ModelConfig.weight_format)."""
    max_num_seqs: int = 64
    """Sequences batched at once by this model's engine."""

    def __post_init__(self) -> None:
        if not self.name or "/" in self.name and self.name.startswith("mixture/"):
            raise ConfigError(f"invalid config name={self.name!r}: must be non-empty and not start with "
                              f"'mixture/'", field="name")
        if self.kv_cache_mib < 1:
            raise ConfigError(f"invalid config kv_cache_mib={self.kv_cache_mib!r}: must be >= 1",
                              field="kv_cache_mib")

    def engine_config(self) -> EngineConfig:
        return EngineConfig(
            model=ModelConfig(model=self.model, dtype=self.dtype, weight_format=self.weight_format,  # type: ignore[arg-type]
                              max_model_len=self.max_model_len),
            cache=CacheConfig(kv_cache_bytes=self.kv_cache_mib << 20),
            scheduler=SchedulerConfig(max_num_seqs=self.max_num_seqs))


def spec_from_arg(arg: str) -> ModelSpec:
    """`name=path` or a bare known name / path (its file stem is the name)."""
    if "=" in arg:
        name, _, model = arg.partition("=")
        return ModelSpec(name=name.strip(), model=model.strip())
    stem = Path(arg).stem if os.sep in arg or arg.endswith(".gguf") else arg
    return ModelSpec(name=stem, model=arg)


def load_models_file(path: str | Path) -> list[ModelSpec]:
    """Read a models file; errors name the file, the entry and the field."""
    p = Path(path)
    try:
        data = json.loads(p.read_text())
    except FileNotFoundError:
        raise
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"invalid models file {p}: {exc}", field="models_file") from exc
    entries = data.get("models") if isinstance(data, dict) else None
    if not isinstance(entries, list) or not entries:
        raise ConfigError(f"invalid models file {p}: expected {{\"models\": [{{\"name\": ..., \"model\": ...}}]}}",
                          field="models_file")
    known = {f.name for f in fields(ModelSpec)}
    specs = []
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict) or "name" not in entry or "model" not in entry:
            raise ConfigError(f"invalid models file {p}: models[{i}] needs 'name' and 'model'", field="models_file")
        unknown = sorted(set(entry) - known)
        if unknown:
            raise ConfigError(f"invalid models file {p}: models[{i}] has unknown field {unknown[0]!r} "
                              f"(known: {', '.join(sorted(known))})", field="models_file")
        model = entry["model"]
        if not Path(model).is_absolute() and (p.parent / model).exists():
            entry = {**entry, "model": str(p.parent / model)}  # relative to the models file
        specs.append(ModelSpec(**entry))
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise ConfigError(f"invalid models file {p}: duplicate model names in {names}", field="models_file")
    return specs


def tensor_bytes(module: torch.nn.Module, extra: list[Any] | None = None) -> int:
    """Bytes of every distinct tensor a module holds: parameters, buffers and tensor attributes (int8
    copies), plus `extra` tensors (KV caches); shared storage counted once."""
    import torch

    seen: set[int] = set()
    total = 0

    def add(t: torch.Tensor) -> None:
        nonlocal total
        key = t.untyped_storage().data_ptr()
        if key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()

    for m in module.modules():
        for t in list(m.parameters(recurse=False)) + list(m.buffers(recurse=False)):
            add(t)
        for v in vars(m).values():
            if isinstance(v, torch.Tensor):
                add(v)
    stack = list(extra or [])
    while stack:
        item = stack.pop()
        if isinstance(item, torch.Tensor):
            add(item)
        elif isinstance(item, list | tuple):
            stack.extend(item)
    return total


class LLMLoader:
    """ModelLoader over mixserve engines: one `LLM` (weights + its own KV cache) per model.

    The estimate before the first load: for safetensors, the tensors' element count (from their headers)
    x the spec's dtype size; for other files (GGUF, quantized), the size on disk x `inflation`; plus the KV
    cache. After a load the measured size is remembered and used from then on.
    """

    def __init__(self, specs: list[ModelSpec], cache_dir: str | Path | None = None,
                 inflation: float = 6.0) -> None:
        self.specs = {s.name: s for s in specs}
        self.cache_dir = cache_dir
        self.inflation = inflation
        self.measured: dict[str, int] = {}

    def estimate_bytes(self, name: str) -> int:
        if name in self.measured:
            return self.measured[name]
        spec = self.specs[name]
        from mixserve.hub import KNOWN_MODELS, cached_path

        path = cached_path(spec.model, self.cache_dir) if spec.model in KNOWN_MODELS else Path(spec.model)
        kv = spec.kv_cache_mib << 20
        if path is None or not path.exists():
            return int((256 << 20) * self.inflation) + kv
        elements = _safetensors_elements(path)
        if elements:  # dense weights: their element count at the engine's dtype (fp32 on disk is not inflated)
            return elements * (2 if spec.dtype == "bfloat16" else 4) + kv
        return int(_disk_bytes(path) * self.inflation) + kv

    def load(self, name: str) -> LoadResult[LLM]:
        from mixserve.llm import LLM

        llm = LLM(config=self.specs[name].engine_config(), cache_dir=self.cache_dir)
        kv_caches = getattr(llm.engine.runner, "kv_caches", [])  # the torch runner's KV tensors
        nbytes = tensor_bytes(llm.model, [kv_caches])
        self.measured[name] = nbytes
        return LoadResult(llm, nbytes)

    def unload(self, name: str, handle: LLM) -> None:
        del handle
        gc.collect()


def _safetensors_elements(path: Path) -> int:
    """Elements of every tensor in the safetensors files at `path` (a file or a folder), read from their
    headers; 0 when there are none (or a header cannot be read)."""
    import json
    import math
    import struct

    files = sorted(path.rglob("*.safetensors")) if path.is_dir() else [path] if path.suffix == ".safetensors" else []
    total = 0
    for f in files:
        try:
            with f.open("rb") as fh:
                (size,) = struct.unpack("<Q", fh.read(8))
                header = json.loads(fh.read(size))
        except (OSError, ValueError, struct.error):
            return 0
        total += sum(math.prod(v["shape"]) for k, v in header.items() if k != "__metadata__")
    return total


def _disk_bytes(path: Path) -> int:
    if path.is_dir():
        return sum(f.stat().st_size for f in path.rglob("*.safetensors")) or sum(
            f.stat().st_size for f in path.rglob("*") if f.is_file())
    return path.stat().st_size
