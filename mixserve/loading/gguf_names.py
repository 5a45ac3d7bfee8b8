"""GGUF -> HF: architecture, tensor names and the value fixes llama.cpp's converter applied.

A GGUF tensor maps to one or more HF tensors (a stacked `[num_experts, ...]` tensor maps to one per
expert). `weight_plan` lists them as `PlannedTensor`s, each saying where its data comes from and
which `Fix` undoes llama.cpp's change:
- llama-architecture q/k rows were permuted for llama.cpp's interleaved (GPT-J style) rope
  (`convert_hf_to_gguf.py: LlamaModel.permute`); `Fix.UNPERMUTE_*` restores HF's half-split order.
- Gemma stores RMSNorm weights as `w + 1` (HF computes `x * (1 + w)`); `Fix.MINUS_ONE` undoes it.
- Qwen2-MoE's shared-expert gate is stored as `[hidden]`; HF has `[1, hidden]`.
The config half lives in `gguf_config.py`; each family's names and config keys are one row of
`gguf_families.ARCH_SPECS`.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import Enum
from typing import Any

from mixserve.loading.errors import CheckpointError


class Fix(Enum):
    """A value/layout change applied to a dequantized tensor before it is handed out."""

    NONE = "none"
    UNPERMUTE_Q = "unpermute_q"
    UNPERMUTE_K = "unpermute_k"
    MINUS_ONE = "minus_one"
    UNSQUEEZE0 = "unsqueeze0"


ConfigExtras = Callable[[dict[str, Any], Callable[..., Any], Mapping[str, tuple[int, ...]]], None]
"""(config, opt(key, default), tensor shapes) -> None: fills family keys into `config` in place."""


@dataclass(frozen=True)
class ArchSpec:
    """How one GGUF architecture names its tensors in HF terms."""

    hf_architecture: str
    model_type: str
    block_names: Mapping[str, str]
    """GGUF per-block tensor stem (`attn_q`) -> HF module path under `model.layers.N.`."""
    expert_prefix: str | None = None
    """HF path of expert E under `model.layers.N.` (with `{e}`), for stacked `ffn_*_exps`."""
    expert_names: Mapping[str, str] | None = None
    """`gate`/`up`/`down` -> HF leaf module name of one expert."""
    permute_qk: bool = False
    norm_plus_one: bool = False
    config: ConfigExtras | None = None
    """Adds the family's own keys to the HF config dict `gguf_config.gguf_hf_config` builds."""


_TOP_LEVEL = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_IGNORED = {"rope_freqs.weight"}  # llama3 rope factors, recomputed from config; never an HF tensor
_BLOCK_RE = re.compile(r"^blk\.(\d+)\.(\w+?)(?:\.(\d+))?\.(weight|bias)$")
_EXPERTS_RE = re.compile(r"^ffn_(gate|up|down)_exps$")


@dataclass(frozen=True)
class PlannedTensor:
    """One HF tensor and where it comes from in the GGUF file."""

    hf_name: str
    gguf_name: str
    expert: int | None
    """Slice index along dim 0 of a stacked expert tensor, or None for the whole tensor."""
    fix: Fix


def weight_plan(path: object, spec: ArchSpec, tensor_shapes: Mapping[str, tuple[int, ...]]
                ) -> list[PlannedTensor]:
    """Every HF tensor the file provides, in file order; raises CheckpointError on unknown names."""
    plan: list[PlannedTensor] = []
    unknown: list[str] = []
    for name, shape in tensor_shapes.items():
        if name in _IGNORED:
            continue
        planned = _plan_one(spec, name, shape)
        if planned is None:
            unknown.append(name)
        plan.extend(planned or [])
    if unknown:
        raise CheckpointError(f"{path}: GGUF tensors with no HF equivalent for {spec.hf_architecture}: "
                              f"{unknown[:8]}{' ...' if len(unknown) > 8 else ''}")
    return plan


def _plan_one(spec: ArchSpec, name: str, shape: tuple[int, ...]) -> list[PlannedTensor] | None:
    stem, _, suffix = name.rpartition(".")
    if stem in _TOP_LEVEL:
        return [PlannedTensor(f"{_TOP_LEVEL[stem]}.{suffix}", name, None, _norm_fix(spec, stem))]
    m = _BLOCK_RE.match(name)
    if m is None:
        return None
    layer, leaf, expert, suffix = m.group(1), m.group(2), m.group(3), m.group(4)
    prefix = f"model.layers.{layer}."
    em = _EXPERTS_RE.match(leaf) if expert is None else re.match(r"^ffn_(gate|up|down)$", leaf)
    if em is not None and spec.expert_prefix is not None and spec.expert_names is not None:
        leaf_name = spec.expert_names[em.group(1)]
        experts = range(shape[0]) if expert is None else [int(expert)]
        return [PlannedTensor(f"{prefix}{spec.expert_prefix.format(e=e)}.{leaf_name}.{suffix}", name,
                              e if expert is None else None, Fix.NONE) for e in experts]
    if expert is not None or leaf not in spec.block_names:
        return None
    hf_name = f"{prefix}{spec.block_names[leaf]}.{suffix}"
    return [PlannedTensor(hf_name, name, None, _block_fix(spec, leaf, suffix))]


def _norm_fix(spec: ArchSpec, stem: str) -> Fix:
    return Fix.MINUS_ONE if spec.norm_plus_one and stem.endswith("norm") else Fix.NONE


def _block_fix(spec: ArchSpec, leaf: str, suffix: str) -> Fix:
    if spec.permute_qk and leaf in ("attn_q", "attn_k"):
        return Fix.UNPERMUTE_Q if leaf == "attn_q" else Fix.UNPERMUTE_K
    if leaf == "ffn_gate_inp_shexp" and suffix == "weight":
        return Fix.UNSQUEEZE0
    return _norm_fix(spec, leaf)
