"""Attention over a view of segments: queries rotated per segment, one softmax across segments.

The query of a run arrives rotated at its segment-local position `l` (the model's RoPE); for part
`k` of the view it is rotated once more by `delta_k = own_start - start_k`, so that its dot product
with a key stored at local position `j` sees the relative position `(own_start + l) - (start_k + j)`
the concatenated sequence would have. Keys are never re-rotated or rewritten.

- `attend_reference`: one run; per segment, scores -> (output, log-sum-exp); segments merged with
  weights `exp(lse_k - logsumexp_k lse_k)`. float32, plain torch: the reference, and the path for
  multi-token runs (prompt and step-header prefill).
- `attend_prefill`: one multi-token run (prompt, step headers). Its queries outnumber its segments'
  starts, so here the run's visible keys are gathered into a temporary buffer and rotated by their
  segment's start (the cache is untouched), then one SDPA call with the global causal/window mask.
- `attend_decode`: every single-token run of the pass at once. The blocks visible to any of them
  are gathered once (views share most blocks); each run's query is rotated per block by the delta
  of the block's segment in that run's view; one masked softmax over all (block, offset) scores,
  which is the same as the log-sum-exp merge of per-segment softmaxes.

Masks: a key is visible when it lies within the length the view names for its segment, causally
(own segment: `j <= l`), and, for sliding-window layers, when the global distance
`(own_start + l) - (start_k + j)` is below the window.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from mixserve.layers.attention import Attention, KVCache
from mixserve.layers.rotary import RotaryEmbedding

if TYPE_CHECKING:
    from mixserve.hogwild.views import Run


def rotate_by(x: torch.Tensor, deltas: torch.Tensor, rotary: RotaryEmbedding) -> torch.Tensor:
    """RoPE by `deltas` (`[n]` positions) on `[n, heads, head_dim]`: composes with the rotation
    already applied, since rotations by a and b make one by a + b."""
    return rotary.rotate(x, rotary.cos_sin(deltas))


def _slots(segment_block_ids: list[int], length: int, block_size: int) -> torch.Tensor:
    j = torch.arange(length)
    table = torch.tensor(segment_block_ids, dtype=torch.long)
    return table[j // block_size] * block_size + j % block_size


def attend_reference(q: torch.Tensor, kv_cache: KVCache, layer: Attention, rotary: RotaryEmbedding,
                     run: Run, block_size: int) -> torch.Tensor:
    """`[n, num_heads, head_dim]` queries of one run -> `[n, num_heads * head_dim]` (see module doc)."""
    n, num_heads, head_dim = q.shape
    group = num_heads // layer.num_kv_heads
    local = torch.arange(run.segment.length, run.segment.length + n)  # query local positions
    own_start = run.own_start
    parts = run.parts
    outs, lses = [], []
    start = 0
    for k, part in enumerate(parts):
        if part.length == 0:
            continue
        delta = torch.full((n,), own_start - start, dtype=torch.long)
        qk = rotate_by(q.float(), delta, rotary) * layer.scale  # [n, heads, head_dim]
        slots = _slots(part.segment.block_ids, part.length, block_size)
        keys = kv_cache[0].index_select(0, slots).float().repeat_interleave(group, dim=1)  # [L, heads, d]
        values = kv_cache[1].index_select(0, slots).float().repeat_interleave(group, dim=1)
        scores = torch.einsum("nhd,lhd->hnl", qk, keys)
        j = torch.arange(part.length)
        allowed = torch.ones(n, part.length, dtype=torch.bool)
        if k == len(parts) - 1:
            allowed &= j[None, :] <= local[:, None]
        if layer.sliding_window is not None:
            distance = (own_start + local)[:, None] - (start + j)[None, :]
            allowed &= distance < layer.sliding_window
        scores = scores.masked_fill(~allowed[None], float("-inf"))
        lse = torch.logsumexp(scores, dim=-1)  # [heads, n]; -inf where nothing is visible
        probs = torch.exp(scores - lse[..., None].clamp_min(torch.finfo(torch.float32).min))
        outs.append(torch.einsum("hnl,lhd->nhd", probs, values))
        lses.append(lse)
        start += part.length
    lse_all = torch.stack(lses)  # [num_segments, heads, n]
    weights = torch.exp(lse_all - torch.logsumexp(lse_all, dim=0, keepdim=True))
    out = sum(w.transpose(0, 1)[..., None] * o for w, o in zip(weights, outs))
    assert isinstance(out, torch.Tensor)
    return out.reshape(n, num_heads * head_dim).to(q.dtype)


def attend_prefill(q: torch.Tensor, kv_cache: KVCache, layer: Attention, rotary: RotaryEmbedding,
                   run: Run, block_size: int) -> torch.Tensor:
    """`[n, num_heads, head_dim]` queries of one run -> `[n, num_heads * head_dim]` (see module doc)."""
    n, num_heads, head_dim = q.shape
    parts = [p for p in run.parts if p.length]
    slots = torch.cat([_slots(p.segment.block_ids, p.length, block_size) for p in parts])
    keys = kv_cache[0].index_select(0, slots).to(q.dtype)  # [num_keys, kv_heads, head_dim]
    values = kv_cache[1].index_select(0, slots).to(q.dtype)
    starts, shifts = 0, []
    for p in parts:
        shifts.append(torch.full((p.length,), starts, dtype=torch.long))
        starts += p.length
    if len(parts) > 1:  # keys to their global positions; the query likewise (own segment last)
        keys = rotate_by(keys, torch.cat(shifts), rotary)
        q = rotate_by(q, torch.full((n,), run.own_start, dtype=torch.long), rotary)
    q_pos = run.own_start + torch.arange(run.segment.length, run.segment.length + n)
    k_pos = torch.arange(starts)
    allowed = k_pos[None, :] <= q_pos[:, None]
    if layer.sliding_window is not None:
        allowed &= (q_pos[:, None] - k_pos[None, :]) < layer.sliding_window
    out = F.scaled_dot_product_attention(q.transpose(0, 1)[None], keys.transpose(0, 1)[None],
                                         values.transpose(0, 1)[None], attn_mask=allowed[None, None],
                                         scale=layer.scale, enable_gqa=num_heads != layer.num_kv_heads)
    return out[0].transpose(0, 1).reshape(n, num_heads * head_dim)


class DecodePlan:
    """Blocks, per-(run, block) deltas and visibility for the single-token runs of one pass."""

    def __init__(self, runs: list[Run], block_size: int) -> None:
        self.block_size = block_size
        pieces: dict[tuple[int, int, int], int] = {}  # (segment, block, occurrence in the view)
        blocks: list[int] = []
        # per run: (piece, delta, visible count, global start of the piece's first slot)
        entries: list[list[tuple[int, int, int, int]]] = []
        self.query_pos: list[int] = []
        for run in runs:
            own_start = run.own_start
            self.query_pos.append(own_start + run.segment.length)
            row = []
            start = 0
            seen: dict[int, int] = {}
            for part in run.parts:
                occurrence = seen[id(part.segment)] = seen.get(id(part.segment), -1) + 1
                for b in range(-(-part.length // block_size)):
                    key = (id(part.segment), b, occurrence)
                    if key not in pieces:
                        pieces[key] = len(blocks)
                        blocks.append(part.segment.block_ids[b])
                    count = min(block_size, part.length - b * block_size)
                    row.append((pieces[key], own_start - start, count, start + b * block_size))
                start += part.length
            entries.append(row)
        num_runs, num_pieces = len(runs), len(blocks)
        self.blocks = torch.tensor(blocks, dtype=torch.long)  # [num_pieces]
        # Filled from flat lists in one go (element-wise tensor writes cost microseconds each).
        flat = [(r * num_pieces + e[0], e[1], e[2], e[3]) for r, row in enumerate(entries) for e in row]
        index = torch.tensor([f[0] for f in flat], dtype=torch.long)
        values = torch.tensor([f[1:] for f in flat], dtype=torch.long).view(-1, 3)
        table = torch.zeros(3, num_runs * num_pieces, dtype=torch.long)
        table[:, index] = values.t()
        self.deltas, self.counts, self.key_start = (t.view(num_runs, num_pieces) for t in table)
        self._biases: dict[int | None, torch.Tensor] = {}
        self._cos_sin: dict[RotaryEmbedding, tuple[torch.Tensor, torch.Tensor]] = {}

    def bias(self, sliding_window: int | None) -> torch.Tensor:
        """`[num_runs, 1, 1, num_pieces * block_size]` float32: 0 where visible, -inf elsewhere."""
        if sliding_window not in self._biases:
            i = torch.arange(self.block_size)
            allowed = i[None, None, :] < self.counts[:, :, None]  # [runs, pieces, block_size]
            if sliding_window is not None:
                pos = torch.tensor(self.query_pos)[:, None, None]
                allowed &= pos - (self.key_start[:, :, None] + i) < sliding_window
            bias = torch.zeros(allowed.shape).masked_fill_(~allowed, float("-inf"))
            self._biases[sliding_window] = bias.view(allowed.shape[0], 1, 1, -1)
        return self._biases[sliding_window]

    def cos_sin(self, rotary: RotaryEmbedding) -> tuple[torch.Tensor, torch.Tensor]:
        """RoPE tables of every (run, piece) delta, `[num_runs * num_pieces, 1, rotary_dim]`."""
        if rotary not in self._cos_sin:
            self._cos_sin[rotary] = rotary.cos_sin(self.deltas.view(-1))
        return self._cos_sin[rotary]


def attend_decode(q: torch.Tensor, kv_cache: KVCache, layer: Attention, rotary: RotaryEmbedding,
                  plan: DecodePlan) -> torch.Tensor:
    """`[num_runs, num_heads, head_dim]` (one query per run) -> `[num_runs, num_heads * head_dim]`."""
    num_runs, num_heads, head_dim = q.shape
    num_pieces, bs, kv_heads = plan.blocks.shape[0], plan.block_size, layer.num_kv_heads
    group = num_heads // kv_heads
    k_cache, v_cache = kv_cache
    # [num_pieces, block_size, kv_heads, head_dim], gathered once for every run
    keys = k_cache.view(-1, bs, kv_heads, head_dim).index_select(0, plan.blocks).to(q.dtype)
    values = v_cache.view(-1, bs, kv_heads, v_cache.shape[-1]).index_select(0, plan.blocks).to(q.dtype)
    q_rep = (q * layer.scale)[:, None].expand(num_runs, num_pieces, num_heads, head_dim)
    q_rot = rotary.rotate(q_rep.reshape(num_runs * num_pieces, num_heads, head_dim), plan.cos_sin(rotary))
    q_rot = q_rot.view(num_runs, num_pieces, kv_heads, group, head_dim)
    scores = torch.einsum("rpkgd,pikd->rkgpi", q_rot, keys).reshape(num_runs, kv_heads, group, -1)
    bias = plan.bias(layer.sliding_window)
    scores = scores + (bias if bias.dtype == scores.dtype else bias.to(scores.dtype))
    probs = scores.softmax(dim=-1).view(num_runs, kv_heads, group, num_pieces, bs)
    out = torch.einsum("rkgpi,pikd->rkgd", probs, values)
    return out.reshape(num_runs, -1)
