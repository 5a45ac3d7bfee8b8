"""Wiring an MoE model to its experts from `ExpertConfig`: which pack, which provider, which predictor.

`prepare_pack` decides where experts come from: a pack folder is used as is; an unpacked MoE
checkpoint with a budget is packed once into the pack cache (automatic placement: the user only
gives the budget); anything else loads the plain way. `build_from_pack` builds the model skeleton,
attaches a `BudgetedExpertProvider` (or fills the in-memory provider from the pack when no budget is
set: the all-in-memory reference, quantized experts included) and converts to the compute dtype
without ever materialising all experts. Not re-exported by `mixserve.experts` (it imports
`layers.moe`, which imports the experts package).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mixserve.config import ExpertConfig
from mixserve.experts.aheadgate import AHEADGATE_FILE, AheadGate
from mixserve.experts.budgeted import BudgetedExpertProvider
from mixserve.experts.pack import write_pack
from mixserve.experts.predict import AffinityPredictor, ExpertPredictor, RouterLookahead
from mixserve.experts.pregate import PREGATE_FILE, PreGate
from mixserve.experts.provider import InMemoryExpertProvider
from mixserve.experts.store import MANIFEST, ExpertStore, PackError
from mixserve.layers.expert_slot import ExpertSlot
from mixserve.layers.moe import Router, moe_layers
from mixserve.models.base import model_class


def is_pack(path: Path) -> bool:
    return path.is_dir() and (path / MANIFEST).is_file()


def pack_tokenizer(pack: Path) -> Path | None:
    """Where a pack's tokenizer lives when it is not in the folder (packs of GGUF files)."""
    manifest = json.loads((pack / MANIFEST).read_text())
    path = manifest.get("tokenizer_path")
    return Path(path) if isinstance(path, str) else None


def _is_moe(path: Path) -> bool:
    cfg_path = path / "config.json"
    if not cfg_path.is_file():
        return False
    cfg = json.loads(cfg_path.read_text())
    return bool(cfg.get("num_experts") or cfg.get("num_local_experts"))


def default_pack_dir(model_path: Path, cache_dir: Path) -> Path:
    """`<cache>/packs/<name>-<hash of path, size and mtime of config and weights>`."""
    stamp = [str(model_path.resolve())]
    for f in sorted(model_path.iterdir()) if model_path.is_dir() else [model_path]:
        st = f.stat()
        stamp.append(f"{f.name}:{st.st_size}:{st.st_mtime_ns}")
    digest = hashlib.sha256("\n".join(stamp).encode()).hexdigest()[:12]
    return cache_dir / "packs" / f"{model_path.name}-{digest}"


def prepare_pack(model_path: Path, config: ExpertConfig, cache_dir: Path) -> Path | None:
    """The pack to load experts from, packing `model_path` first when a budget needs one; None to
    load the checkpoint the ordinary way (no budget, or a dense model)."""
    if is_pack(model_path):
        return model_path
    if config.memory_budget is None:
        return None
    if model_path.is_file() or not _is_moe(model_path):
        raise PackError(f"{model_path}: an expert memory budget needs an MoE model in an HF folder or an "
                        f"expert pack (`mixserve pack`); this is not one")
    out = Path(config.pack_dir).expanduser() if config.pack_dir else default_pack_dir(model_path, cache_dir)
    if not is_pack(out):
        write_pack(model_path, out, overwrite=True)
    return out


def moe_routers(model: nn.Module) -> dict[int, Router]:
    """Each MoE layer's router (the live module, so later dtype changes follow)."""
    return {m.layer_idx: m.gate for m in moe_layers(model)}


def expert_slot(model: nn.Module) -> ExpertSlot:
    """The `ExpertSlot` of an MoE model (every MoE family has exactly one)."""
    slots = [m for m in model.modules() if isinstance(m, ExpertSlot)]
    if len(slots) != 1:
        raise ValueError(f"{type(model).__name__}: expected one ExpertSlot (an MoE family), found {len(slots)}")
    return slots[0]


def make_predictor(model: nn.Module, config: ExpertConfig, num_experts: int) -> ExpertPredictor | None:
    """The per-layer predictor of `config.prefetch` (router, affinity); None for the others."""
    layers = moe_layers(model)
    top_m = config.prefetch_top_m or layers[0].top_k
    if config.prefetch == "router":
        return RouterLookahead(moe_routers(model), top_m)
    if config.prefetch == "affinity":
        return AffinityPredictor([m.layer_idx for m in layers], num_experts, top_m)
    return None


def predictor_file(pack: Path, name: str) -> Path:
    """Where a fitted predictor file lives: the pack (copied there by `write_pack`), else the checkpoint
    the pack was made from; a PackError naming both and the command that writes it when neither has it."""
    candidates = [pack / name]
    source = json.loads((pack / MANIFEST).read_text()).get("source")
    if isinstance(source, str):
        candidates.append(Path(source) / name)
    for path in candidates:
        if path.is_file():
            return path
    raise PackError(f"--expert-prefetch needs {name}, found in neither {' nor '.join(map(str, candidates))}; "
                    f"`mixserve refit-pregate MODEL` (or `mixserve moefy`) writes it")


def attach_gate(provider: BudgetedExpertProvider, model: nn.Module, config: ExpertConfig, pack: Path) -> None:
    """`--expert-prefetch gate|pregate`: load the fitted predictor and give it to the provider. Its layer
    positions map onto the model's MoE layers in order (a model with dense layers keeps them apart)."""
    layer_ids = [m.layer_idx for m in moe_layers(model)]
    if config.prefetch == "pregate":
        path = predictor_file(pack, PREGATE_FILE)
        gate = PreGate.load(path.parent, config.prefetch_top_m)
        if len(gate.layer_ids) != len(layer_ids) or gate.num_experts != provider.num_experts:
            raise PackError(f"{path}: predicts {len(gate.layer_ids)} layers x {gate.num_experts} experts, the "
                            f"model has {len(layer_ids)} MoE layers x {provider.num_experts} experts")
        gate.layer_ids = layer_ids
        provider.step_predictor = gate
    elif config.prefetch == "gate":
        path = predictor_file(pack, AHEADGATE_FILE)
        ahead = AheadGate.load(path.parent, config.prefetch_top_m)
        if len(ahead.layer_ids) != len(layer_ids) or ahead.num_experts != provider.num_experts:
            raise PackError(f"{path}: predicts {len(ahead.layer_ids)} layers x {ahead.num_experts} experts, the "
                            f"model has {len(layer_ids)} MoE layers x {provider.num_experts} experts")
        provider.predictor = AheadGate(ahead.weight, layer_ids, ahead.distance, ahead.top_m)


def _check_matches(store: ExpertStore, mem: InMemoryExpertProvider) -> None:
    for name, want in (("layer_ids", mem.layer_ids), ("num_experts", mem.num_experts),
                       ("hidden_size", mem.hidden_size), ("intermediate_size", mem.intermediate_size)):
        got = getattr(store, name)
        if got != want:
            raise PackError(f"{store.folder / MANIFEST}: field {name!r} is {got!r}, the model's config says "
                            f"{want!r}")


def total_expert_nbytes(store: ExpertStore, dtype: torch.dtype) -> int:
    """Bytes all experts take resident in a budgeted provider (the base of a fractional budget)."""
    probe = BudgetedExpertProvider.slot_sizes(store, dtype)
    return sum(probe[i] * store.num_experts for i in store.layer_ids)


def build_from_pack(hf_config: dict[str, Any], pack: Path, config: ExpertConfig, dtype: torch.dtype
                    ) -> tuple[nn.Module, BudgetedExpertProvider | None]:
    """The model skeleton (non-expert weights still to load) with experts from `pack`."""
    with torch.device("cpu"):
        model = model_class(hf_config)(hf_config)
    slot = expert_slot(model)
    mem = slot.loader
    assert mem is not None  # a fresh model loads its experts in memory until a provider is set
    store = ExpertStore(pack, direct_io=config.direct_io, verify_checksums=config.verify_checksums)
    _check_matches(store, mem)
    budget = config.budget
    if budget is None:
        model = model.to(dtype)
        fill_in_memory(mem, store, dtype)
        store.close()
        slot.set_provider(mem)  # all resident, from the pack: load_weights then expects no experts
        return model, None
    budget_nbytes = budget.resolve(total_expert_nbytes(store, dtype))
    provider = BudgetedExpertProvider(store, budget_nbytes, dtype, policy=config.policy,
                                      predictor=None, io_threads=config.io_threads)
    slot.set_provider(provider)  # drops the (never touched) in-memory stacks
    model = model.to(dtype)
    provider.predictor = make_predictor(model, config, store.num_experts)
    attach_gate(provider, model, config, pack)
    return model, provider


def fill_in_memory(mem: InMemoryExpertProvider, store: ExpertStore, dtype: torch.dtype) -> None:
    """Every expert of `store`, decoded to `dtype`, into the stacks of `mem` (all resident)."""
    with torch.no_grad():
        for layer_idx in store.layer_ids:
            gate_up, down = mem.stacks(layer_idx)
            for e in range(store.num_experts):
                gu, dn = store.dequantized(layer_idx, e, dtype)
                gate_up[e].copy_(gu)
                down[e].copy_(dn)
