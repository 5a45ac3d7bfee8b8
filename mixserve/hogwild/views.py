"""Views: ordered segments a query attends to, and the batch of runs one forward pass computes.

A view is a tuple of `ViewPart(segment, length)`: the first `length` tokens of each segment, laid
end to end. Part `k` starts at global position `start_k = sum(length of parts before k)`; its token
`j` (key rotated at local position `j`) sits at global position `start_k + j`. A `Run` writes new
tokens into its own segment (the last part of its view) at local positions `l`, so the model rotates
their queries and keys at `l`; the query then sits at global position `own_start + l`, and RoPE only
sees relative positions, so attending part `k` needs the query rotated by one more
`delta_k = own_start - start_k` (the worker's offset to that segment's start) and nothing else.

Every run of one forward pass may share segments with the others; all K/V of the pass are written
before any layer attends (as in a chunked prefill), so a run may see tokens written by another run
of the same pass, up to the length its view names.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mixserve.hogwild.segments import Segment, SegmentPool
from mixserve.hogwild.view_attention import DecodePlan, attend_decode, attend_prefill, attend_reference
from mixserve.layers.attention import Attention, KVCache
from mixserve.layers.rotary import RotaryEmbedding


@dataclass(frozen=True)
class ViewPart:
    """The first `length` tokens of `segment`, as one piece of a view (a segment may appear at several
    places of one view, e.g. the pivot after each other worker: the same keys, other deltas)."""

    segment: Segment
    length: int


@dataclass(frozen=True)
class Run:
    """New tokens of one query sequence: written to `segment` after its current tokens, attending
    `context` (the view before the segment) and, causally, the segment itself."""

    context: tuple[ViewPart, ...]
    segment: Segment
    token_ids: tuple[int, ...]

    def __post_init__(self) -> None:
        if not self.token_ids:
            raise ValueError(f"run into segment {self.segment.name!r} has no tokens")
        if any(p.segment is self.segment for p in self.context):
            raise ValueError(f"run into {self.segment.name!r}: its own segment is also in its context")

    @property
    def parts(self) -> tuple[ViewPart, ...]:
        """The whole view, own segment last (at its length after this run)."""
        return (*self.context, ViewPart(self.segment, self.segment.length + len(self.token_ids)))

    @property
    def own_start(self) -> int:
        return sum(p.length for p in self.context)


def layer_rotaries(model: torch.nn.Module) -> dict[Attention, RotaryEmbedding]:
    """The RoPE of every attention layer: each family's attention module holds `attn` (an
    `Attention`) next to `rotary` (its `RotaryEmbedding`). ValueError names a layer without one."""
    found: dict[Attention, RotaryEmbedding] = {}
    for name, module in model.named_modules():
        attn = getattr(module, "attn", None)
        if isinstance(attn, Attention):
            rotary = getattr(module, "rotary", None)
            if not isinstance(rotary, RotaryEmbedding):
                raise ValueError(f"hogwild needs RoPE: attention layer {name!r} has no rotary embedding")
            found[attn] = rotary
    if not found:
        raise ValueError(f"hogwild: {type(model).__name__} has no attention layers it can drive")
    return found


class ViewBatch:
    """The runs of one forward pass: input tensors, and per-layer attention over each run's view.

    Single-token runs (decodes) go through the fast path (`view_attention.attend_decode`): one gather
    of the union of their visible blocks, queries rotated per (run, block), one softmax across all
    segments. Longer runs go through `attend_prefill` (keys rotated in a temporary buffer, SDPA).
    With `reference`, every run goes through `attend_reference` (per-segment attention with the
    query rotated per segment, log-sum-exp merge).
    """

    def __init__(self, runs: list[Run], segments: SegmentPool, rotaries: dict[Attention, RotaryEmbedding],
                 reference: bool = False) -> None:
        self.runs = runs
        self.reference = reference
        self.block_size = segments.block_size
        self.rotaries = rotaries
        ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        self.rows: list[range] = []
        for run in runs:
            start = run.segment.length
            self.rows.append(range(len(ids), len(ids) + len(run.token_ids)))
            ids.extend(run.token_ids)
            positions.extend(range(start, start + len(run.token_ids)))
            slots.extend(segments.slots(run.segment, start, len(run.token_ids)))
        self.input_ids = torch.tensor(ids, dtype=torch.long)  # [num_tokens]
        self.positions = torch.tensor(positions, dtype=torch.long)  # segment-local
        self.slot_mapping = torch.tensor(slots, dtype=torch.long)
        self.decode_runs = [] if reference else [i for i, r in enumerate(runs) if len(r.token_ids) == 1]
        decode = set(self.decode_runs)
        self.other_runs = [i for i in range(len(runs)) if i not in decode]
        self.decode_plan = None
        if self.decode_runs:
            self.decode_plan = DecodePlan([runs[i] for i in self.decode_runs], self.block_size)

    @property
    def last_rows(self) -> list[int]:
        """Row of each run's last token (whose logits predict the run's next token)."""
        return [r[-1] for r in self.rows]

    def attend(self, q: torch.Tensor, kv_cache: KVCache, layer: Attention) -> torch.Tensor:
        rotary = self.rotaries[layer]
        out = q.new_empty(q.shape[0], layer.num_heads * layer.head_dim)
        if self.decode_plan is not None:
            rows = torch.tensor([self.rows[i][0] for i in self.decode_runs])
            out[rows] = attend_decode(q[rows], kv_cache, layer, rotary, self.decode_plan)
        for i in self.other_runs:
            rows_i = self.rows[i]
            attend = attend_reference if self.reference else attend_prefill
            out[rows_i.start:rows_i.stop] = attend(
                q[rows_i.start:rows_i.stop], kv_cache, layer, rotary, self.runs[i], self.block_size)
        return out
