"""`mixserve pack MODEL OUT`: rewrite any supported MoE checkpoint as an expert pack (see `store.py`).

The source is read tensor by tensor (safetensors mmap or GGUF dequantization); an expert is encoded
and appended to the blob file as soon as its gate, up and down matrices have all been seen, so
memory stays at a few experts (or one fused `[num_experts, ...]` tensor) regardless of model size.
Non-expert tensors go to `model.safetensors`; config and tokenizer files are copied. The manifest is
written last, so an interrupted pack is never mistaken for a complete one.
"""

from __future__ import annotations

import json
import os
import shutil
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from tqdm import tqdm

from mixserve.experts.provider import ExpertKey, ExpertProj
from mixserve.experts.quant import EXPERT_DTYPES, ExpertDtype, encode
from mixserve.experts.store import ALIGNMENT, BLOB_FILE, MANIFEST, PACK_FORMAT, PACK_VERSION, PackError
from mixserve.loading.checkpoint import open_weights
from mixserve.models.base import model_class

DtypeChooser = Callable[[int, int, torch.dtype], ExpertDtype]
"""(layer_idx, expert_id, stored dtype) -> the encoding of that expert."""
_STORED = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
_SKIP_COPY = (".safetensors", ".gguf", ".bin", ".pt", ".pth")
_PREDICTOR_FILES = ("pregate.safetensors", "aheadgate.safetensors")
"""Fitted expert predictors travel with the pack (`--expert-prefetch pregate|gate` read them there)."""


def dtype_plan(default: str = "auto", overrides: dict[str, str] | None = None) -> DtypeChooser:
    """A chooser: `default` for every expert (`auto`: the stored dtype if plain, else bfloat16),
    overridden per layer (`"3"`) or per expert (`"3.17"`), as EdgeMoE's expert-wise bit widths."""
    overrides = dict(overrides or {})
    for key, value in [("default", default), *overrides.items()]:
        if value != "auto" and value not in EXPERT_DTYPES:
            raise ValueError(f"expert dtype plan: {key}={value!r}; expected auto or one of "
                             f"{', '.join(EXPERT_DTYPES)}")

    def choose(layer_idx: int, expert_id: int, stored: torch.dtype) -> ExpertDtype:
        value = overrides.get(f"{layer_idx}.{expert_id}", overrides.get(str(layer_idx), default))
        if value == "auto":
            return _STORED.get(stored, "bfloat16")  # type: ignore[return-value]
        return value  # type: ignore[return-value]

    return choose


class _BlobWriter:
    """Appends aligned, padded blobs to the blob file and records manifest entries."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.file = path.open("wb")
        self.offset = 0
        self.entries: list[dict[str, Any]] = []

    def add(self, layer_idx: int, expert_id: int, fmt: ExpertDtype, blob: bytes) -> None:
        padded = -(-len(blob) // ALIGNMENT) * ALIGNMENT
        self.file.write(blob)
        self.file.write(b"\0" * (padded - len(blob)))
        self.entries.append({"layer": layer_idx, "expert": expert_id, "dtype": fmt, "offset": self.offset,
                             "nbytes": len(blob), "crc32": zlib.crc32(blob)})
        self.offset += padded

    def close(self) -> None:
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()


def _moe_shape(cfg: dict[str, Any]) -> tuple[int, int, int, int]:
    """(hidden_size, expert intermediate size, num_experts, top_k) of an HF MoE config."""
    num_experts = cfg.get("num_experts", cfg.get("num_local_experts"))
    inter = cfg.get("moe_intermediate_size") or cfg.get("intermediate_size")
    if not num_experts or not inter or not cfg.get("num_experts_per_tok"):
        raise PackError("config.json: not an MoE model (needs num_experts/num_local_experts, "
                        "num_experts_per_tok and an intermediate size)")
    return int(cfg["hidden_size"]), int(inter), int(num_experts), int(cfg["num_experts_per_tok"])


def _parts_of(key: ExpertKey, tensor: torch.Tensor, num_experts: int
              ) -> list[tuple[int, ExpertProj, torch.Tensor]]:
    if key.expert_id is not None:
        return [(key.expert_id, key.proj, tensor)]
    return [(e, key.proj, tensor[e]) for e in range(num_experts)]


def _gate_up_down(parts: dict[ExpertProj, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor] | None:
    if ExpertProj.DOWN not in parts:
        return None
    if ExpertProj.GATE_UP in parts:
        return parts[ExpertProj.GATE_UP], parts[ExpertProj.DOWN]
    if ExpertProj.GATE in parts and ExpertProj.UP in parts:
        return torch.cat([parts[ExpertProj.GATE], parts[ExpertProj.UP]]), parts[ExpertProj.DOWN]
    return None


def write_pack(model: str | Path, out: str | Path, *, choose: DtypeChooser | None = None,
               overwrite: bool = False, progress: bool = True) -> Path:
    """Pack the MoE checkpoint at `model` (HF folder or GGUF file) into folder `out`; returns `out`."""
    src, out = Path(model).expanduser(), Path(out).expanduser()
    if (out / MANIFEST).exists() and not overwrite:
        raise PackError(f"{out / MANIFEST}: already exists; remove the folder or pass overwrite")
    cfg, source = open_weights(src)
    cls: Any = model_class(cfg)
    hidden, inter, num_experts, top_k = _moe_shape(cfg)
    choose = choose or dtype_plan()
    out.mkdir(parents=True, exist_ok=True)
    (out / MANIFEST).unlink(missing_ok=True)
    writer = _BlobWriter(out / BLOB_FILE)
    pending: dict[tuple[int, int], dict[ExpertProj, torch.Tensor]] = {}
    dense: dict[str, torch.Tensor] = {}
    try:
        for name, tensor in tqdm(source.iter_tensors(), total=len(source.names), desc=f"pack {src.name}",
                                 unit="tensor", disable=not progress):
            key = cls.expert_key(name)
            if key is None:
                dense[name] = tensor.contiguous()
                continue
            for expert_id, proj, t in _parts_of(key, tensor, num_experts):
                parts = pending.setdefault((key.layer_idx, expert_id), {})
                parts[proj] = t
                if (pair := _gate_up_down(parts)) is not None:
                    fmt = choose(key.layer_idx, expert_id, t.dtype)
                    writer.add(key.layer_idx, expert_id, fmt, encode(fmt, *pair))
                    del pending[(key.layer_idx, expert_id)]
    finally:
        writer.close()
    if pending:
        (layer_idx, expert_id), parts = next(iter(pending.items()))
        raise PackError(f"{src}: expert {expert_id} of layer {layer_idx} is incomplete (has only "
                        f"{sorted(p.value for p in parts)})")
    save_file(dense, str(out / "model.safetensors"))
    _copy_side_files(src, out, cfg)
    layer_ids = sorted({e["layer"] for e in writer.entries})
    manifest = {"format": PACK_FORMAT, "version": PACK_VERSION, "architecture": cfg["architectures"][0],
                "source": str(src.resolve()), "hidden_size": hidden, "intermediate_size": inter,
                "num_experts": num_experts, "top_k": top_k, "layer_ids": layer_ids, "blob_file": BLOB_FILE,
                "alignment": ALIGNMENT, "experts": writer.entries}
    if src.is_file():  # GGUF: the tokenizer stays in the source file
        manifest["tokenizer_path"] = str(src.resolve())
    tmp = out / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest))
    tmp.replace(out / MANIFEST)
    return out


def _copy_side_files(src: Path, out: Path, cfg: dict[str, Any]) -> None:
    """config.json, tokenizer and generation files of an HF folder (a GGUF source: config.json only)."""
    if src.is_dir():
        for f in src.iterdir():
            keep = f.name in _PREDICTOR_FILES or not f.name.endswith(_SKIP_COPY)
            if f.is_file() and keep and not f.name.endswith(".index.json") and f.name != MANIFEST:
                shutil.copyfile(f, out / f.name)
    else:
        (out / "config.json").write_text(json.dumps(cfg, indent=1))
