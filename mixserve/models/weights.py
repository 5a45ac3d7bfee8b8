"""HF tensor names -> views of our (partly fused) parameters; shared by every family's load_weights."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from mixserve.models.base import WeightError

Splits = dict[str, list[tuple[str, int | None]]]
"""Fused projection name -> the HF projections stacked in its rows, in order, with their row counts
(None: an equal share of the rows left over, e.g. gate/up)."""


def fused_targets(module: nn.Module, fused: Splits, prefix: str = "") -> dict[str, torch.Tensor]:
    """HF tensor name -> the view of our parameter it fills (a row range for fused projections).

    A tied LM head is deduplicated away by `named_parameters`.
    """
    targets: dict[str, torch.Tensor] = {}
    for name, param in module.named_parameters(prefix=prefix):
        owner, _, leaf = name.rpartition(".")
        base, _, proj = owner.rpartition(".")
        if proj not in fused:
            targets[name] = param.data
            continue
        parts = fused[proj]
        known = sum(rows for _, rows in parts if rows is not None)
        num_open = sum(1 for _, rows in parts if rows is None)
        share = (param.shape[0] - known) // num_open if num_open else 0
        start = 0
        for hf_proj, rows in parts:
            count = share if rows is None else rows
            targets[f"{base}.{hf_proj}.{leaf}"] = param.data[start:start + count]
            start += count
    return targets


def copy_into(targets: dict[str, torch.Tensor], name: str, tensor: torch.Tensor) -> None:
    """Copy one checkpoint tensor into its target, consuming it; WeightError names any mismatch."""
    dst = targets.pop(name, None)
    if dst is None:
        raise WeightError(f"unexpected (or repeated) checkpoint tensor {name!r}")
    if dst.shape != tensor.shape:
        raise WeightError(f"tensor {name!r} has shape {tuple(tensor.shape)}, expected {tuple(dst.shape)}")
    dst.copy_(tensor)


def dense_splits(num_heads: int, num_kv_heads: int, head_dim: int, intermediate_size: int) -> Splits:
    """The fused projections of a dense block: q/k/v and gate/up."""
    q, kv = num_heads * head_dim, num_kv_heads * head_dim
    return {"qkv_proj": [("q_proj", q), ("k_proj", kv), ("v_proj", kv)],
            "gate_up_proj": [("gate_proj", intermediate_size), ("up_proj", intermediate_size)]}


def load_dense_weights(module: nn.Module, weights: Iterable[tuple[str, torch.Tensor]], fused: Splits,
                       tied: bool) -> None:
    """Copy HF tensors into `module`, fused projections by row range; a tied LM head's tensor is
    skipped (HF drops or ignores it). Raises WeightError naming what is missing or mismatched."""
    targets = fused_targets(module, fused)
    for name, tensor in weights:
        if name.endswith("inv_freq") or (tied and name == "lm_head.weight"):
            continue
        copy_into(targets, name, tensor)
    if targets:
        raise WeightError(f"checkpoint is missing {len(targets)} tensor(s), e.g. {sorted(targets)[:3]}")
