"""One forward pass of the model over a batch of `Run`s (each attending its own view)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mixserve.hogwild.segments import SegmentPool
from mixserve.hogwild.views import Run, ViewBatch, layer_rotaries
from mixserve.layers.attention import Attention, AttentionMetadata, KVCache
from mixserve.layers.rotary import RotaryEmbedding
from mixserve.models.base import CausalLM, as_causal_lm


@dataclass
class ViewModel:
    """A model with the paged KV caches it writes (all layers) and the RoPE of each layer."""

    model: CausalLM
    kv_caches: list[KVCache]
    rotaries: dict[Attention, RotaryEmbedding]

    @staticmethod
    def of(module: torch.nn.Module, kv_caches: list[KVCache]) -> ViewModel:
        model = as_causal_lm(module)
        num_layers = model.kv_cache_spec().end
        if len(kv_caches) != num_layers:
            raise ValueError(f"hogwild needs the KV caches of all {num_layers} layers, got {len(kv_caches)} "
                             f"(a staged runner owning only some layers cannot run it)")
        return ViewModel(model, kv_caches, layer_rotaries(module))

    @property
    def num_layers(self) -> int:
        return len(self.kv_caches)


@torch.inference_mode()
def forward_runs(vm: ViewModel, segments: SegmentPool, runs: list[Run], *, reference: bool = False,
                 all_logits: bool = False) -> torch.Tensor:
    """Write every run's K/V into its segment and return float32 logits: `[num_runs, vocab]` of each
    run's last token, or `[num_tokens, vocab]` of every token when `all_logits` (runs in order).
    Room in the segments is reserved here; the tokens are committed to them after the pass."""
    for run in runs:
        segments.reserve(run.segment, len(run.token_ids))
    batch = ViewBatch(runs, segments, vm.rotaries, reference=reference)
    query_lens = [len(r.token_ids) for r in runs]
    seq_lens = [r.own_start + r.segment.length + len(r.token_ids) for r in runs]
    meta = AttentionMetadata(query_lens=query_lens, seq_lens=seq_lens, slot_mapping=batch.slot_mapping,
                             kv_slots=None, q_index=None, view=batch)
    hidden = vm.model.embed(batch.input_ids)
    hidden = vm.model.forward_layers(hidden, batch.positions, meta, vm.kv_caches, 0, vm.num_layers)
    if not all_logits:
        hidden = hidden[torch.tensor(batch.last_rows)]
    logits = vm.model.head(hidden)
    for run in runs:
        segments.commit(run.segment, list(run.token_ids))
    return logits
