"""Batch-invariant numerics (`ModelConfig.batch_invariant`): a token's logits depend only on its own
sequence, never on what else is in the step, how the prompt was chunked, or prefix-cache hits.

What varies with the batch in the default path, and what this mode does instead (all measured on this
machine's kernels, tests/layers/test_invariant.py checks them):

- The int8 / int4 weight kernels (`layers/quant.py`) compute each row alone: already invariant.
- fp32 `F.linear` (dense weights, MoE routers and dense experts) picks its kernel by the row count, so a
  row's result changes with the batch (1 row vs 2, 2 vs 4, ...). With a fixed row count a row's result
  depends on nothing else in the call, so `tiled_linear` runs every call as tiles of exactly `TILE` rows
  (the last padded with zeros).
- Attention: SDPA and the padded decode matmuls reduce over the padded key length of the whole group,
  which depends on the other sequences and on the chunk. `InvariantAttention` gives each query row its
  own keys, padded to `bucket(p) = ceil((p + 1) / KEY_BUCKET) * KEY_BUCKET` (a function of the query's
  position alone), and computes scores and outputs as elementwise products summed over the last axis,
  whose reduction order depends only on that axis' length.

Every other op of a step is row-wise (norms, rotary, activations, the sampler's softmax over the
vocabulary). The price is speed (see BENCHMARKS.md); the default path is unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:
    from mixserve.layers.attention import Attention

TILE = 16
"""Rows per fp32 matmul call in batch-invariant mode."""
KEY_BUCKET = 16
"""Key lengths are padded to a multiple of this (a function of the query position only)."""
_MAX_TEMP_ELEMENTS = 1 << 22
"""Bound on the elementwise-product temporaries of one attention chunk (16 MiB of float32)."""


def tiled_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`F.linear(x, weight, bias)` computed in calls of exactly `TILE` rows, so each row's result is
    bitwise independent of the other rows (their number, values and the row's place among them)."""
    flat = x.reshape(-1, x.shape[-1])
    rows = flat.shape[0]
    padded = -(-rows // TILE) * TILE
    if padded != rows:
        flat = torch.cat([flat, flat.new_zeros(padded - rows, flat.shape[1])])
    out = torch.cat([F.linear(flat[i:i + TILE], weight) for i in range(0, padded, TILE)])[:rows]
    if bias is not None:
        out = out + bias
    return out.view(*x.shape[:-1], weight.shape[0])


def set_batch_invariant(model: nn.Module, enabled: bool = True) -> int:
    """Switch every module of `model` that has an `invariant` flag (Linear, MoE routers and experts);
    returns how many were switched."""
    count = 0
    for module in model.modules():
        if hasattr(module, "invariant"):
            setattr(module, "invariant", enabled)  # noqa: B010 - any module with the flag
            count += 1
    return count


def key_bucket(position: int) -> int:
    return -(-(position + 1) // KEY_BUCKET) * KEY_BUCKET


@dataclass
class InvariantAttention:
    """`ViewAttention` for batch-invariant steps: built once per step by the runner, used by every layer.

    `rows[r]` is the sequence index of packed query row r and `positions[r]` its absolute position;
    `contexts[i]` the cache slots of sequence i's keys `0 .. seq_len - 1`.
    """

    positions: list[int]
    rows: list[int]
    contexts: list[torch.Tensor]

    def __post_init__(self) -> None:
        # Query rows grouped by key bucket; per group the [rows, bucket] key slots and visibility.
        by_bucket: dict[int, list[int]] = {}
        for r, p in enumerate(self.positions):
            by_bucket.setdefault(key_bucket(p), []).append(r)
        self._groups: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        for length, members in sorted(by_bucket.items()):
            slots = torch.zeros(len(members), length, dtype=torch.long)
            for i, r in enumerate(members):
                ctx = self.contexts[self.rows[r]][:min(length, self.positions[r] + 1)]
                slots[i, :len(ctx)] = ctx
            self._groups.append((torch.tensor(members), slots, torch.tensor([self.positions[r] for r in members])))

    def attend(self, q: torch.Tensor, kv_cache: tuple[torch.Tensor, torch.Tensor], layer: Attention) -> torch.Tensor:
        num_heads, num_kv, head_dim = layer.num_heads, layer.num_kv_heads, layer.head_dim
        group = num_heads // num_kv
        out = q.new_empty(q.shape[0], num_heads * head_dim)
        window = layer.sliding_window
        for members, slots, pos in self._groups:
            length = slots.shape[1]
            j = torch.arange(length)
            visible = j[None, :] <= pos[:, None]
            if window is not None:
                visible &= (pos[:, None] - j[None, :]) < window
            step = max(1, _MAX_TEMP_ELEMENTS // (num_heads * length * head_dim))
            for s in range(0, len(members), step):
                rows, sl, vis = members[s:s + step], slots[s:s + step], visible[s:s + step]
                n = len(rows)
                keys = kv_cache[0].index_select(0, sl.view(-1)).view(n, length, num_kv, head_dim).to(q.dtype)
                values = kv_cache[1].index_select(0, sl.view(-1)).view(n, length, num_kv, head_dim).to(q.dtype)
                qg = (q[rows] * layer.scale).view(n, num_kv, group, 1, head_dim)
                scores = (qg * keys.permute(0, 2, 1, 3)[:, :, None]).sum(-1)  # [n, kv, group, length]
                scores = scores.masked_fill(~vis[:, None, None, :], float("-inf"))
                probs = scores.softmax(dim=-1)
                vt = values.permute(0, 2, 3, 1)[:, :, None]  # [n, kv, 1, head_dim, length]
                o = (probs[:, :, :, None, :] * vt).sum(-1)  # [n, kv, group, head_dim]
                out[rows] = o.reshape(n, num_heads * head_dim)
        return out
