"""`DecoderLM`: the `CausalLM` stages every family shares, written once.

A family's top-level class lays itself out as HF does (`self.model` holds `embed_tokens`, `rotary`,
`layers` and `norm`; `self.lm_head` is the head; `self.args` its parsed config) and subclasses
`DecoderLM` (or `MoEDecoderLM`) for the stage plumbing; it overrides only what differs (Gemma3: the
embedding scale, two RoPE tables, the logit softcap). Its own file still holds every block, its
config view and its weight map.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, cast

import torch
from torch import nn

from mixserve.experts.provider import ExpertProvider
from mixserve.experts.trace import RoutingObserver
from mixserve.layers.attention import AttentionMetadata, KVCache
from mixserve.layers.expert_slot import ExpertSlot
from mixserve.layers.linear import Linear
from mixserve.models.base import KVCacheSpec, check_layer_range, run_blocks, whole_model


class DecoderLM(nn.Module):
    """Embed -> blocks `[start, end)` -> final norm + LM head over the paged KV cache."""

    def __init__(self, args: Any, model: nn.Module) -> None:
        super().__init__()
        self.args = args
        self.model: Any = model  # the family's HF-shaped trunk
        head = Linear(args.hidden_size, args.vocab_size)
        if args.tie_word_embeddings:
            head.weight = cast(nn.Parameter, self.model.embed_tokens.weight)  # type: ignore[union-attr]
        self.lm_head = head

    def block_extras(self, positions: torch.Tensor, meta: AttentionMetadata, start: int) -> tuple[object, ...]:
        """What every block of a stage takes after the attention metadata (MoE: provider, observer)."""
        return ()

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.embed_tokens(input_ids)  # [num_tokens, hidden_size]

    def forward_layers(self, hidden: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
                       kv_caches: list[KVCache], start: int, end: int) -> torch.Tensor:
        check_layer_range(start, end, self.args.num_hidden_layers, kv_caches)
        return run_blocks(self.model.layers, self.model.rotary, hidden, positions, meta,
                          kv_caches, start, end, *self.block_extras(positions, meta, start))

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.model.norm(hidden)).float()  # [n, vocab_size]

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
                kv_caches: list[KVCache]) -> torch.Tensor:
        return whole_model(self, input_ids, positions, meta, kv_caches, self.args.num_hidden_layers)

    def kv_cache_spec(self) -> KVCacheSpec:
        a = self.args
        return KVCacheSpec.uniform(a.num_hidden_layers, a.num_key_value_heads, a.head_dim)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """The family's weight map (in its own file)."""
        raise NotImplementedError(f"{type(self).__name__} must define load_weights")


class MoEDecoderLM(DecoderLM):
    """A `DecoderLM` whose MoE blocks borrow expert weights from `experts`.

    `experts` is the `ExpertProvider` every MoE layer borrows weights from (an all-resident
    `InMemoryExpertProvider`, filled by `load_weights`, until `set_expert_provider`); a
    `RoutingObserver` set with `set_routing_observer` sees every routing decision. Both live in
    `expert_slot` (`layers/expert_slot.py`). The observer's step begins with the stage at layer 0.
    """

    def __init__(self, args: Any, model: nn.Module, expert_slot: ExpertSlot) -> None:
        super().__init__(args, model)
        self.expert_slot = expert_slot

    @property
    def experts(self) -> ExpertProvider:
        return self.expert_slot.provider

    def set_expert_provider(self, provider: ExpertProvider) -> None:
        self.expert_slot.set_provider(provider)

    def set_routing_observer(self, observer: RoutingObserver | None) -> None:
        self.expert_slot.observer = observer

    def block_extras(self, positions: torch.Tensor, meta: AttentionMetadata, start: int) -> tuple[object, ...]:
        slot = self.expert_slot
        observer = slot.begin_step(positions, meta.query_lens) if start == 0 else slot.observer
        return (self.experts, observer)
