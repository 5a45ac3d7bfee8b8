"""HF tensor names -> views of our (partly fused) parameters; shared by every family's load_weights."""

from __future__ import annotations

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
