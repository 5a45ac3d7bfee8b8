"""Issue 16's fixes to the budgeted provider: honest hit counts under waves, quantized experts budgeted
at their stored size, per-layer capacity planned from a routing trace."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mixserve.experts.budgeted import BudgetedExpertProvider
from mixserve.experts.capacity import hit_curves, plan_capacity_from_trace
from mixserve.experts.store import ExpertStore
from mixserve.experts.trace import RoutingTrace

NUM_EXPERTS, HIDDEN = 8, 64


def _run_layer(provider: BudgetedExpertProvider, layer_idx: int, topk_ids: torch.Tensor) -> None:
    active = sorted(set(topk_ids.flatten().tolist()))
    for wave in provider.plan(layer_idx, torch.randn(topk_ids.shape[0], HIDDEN), topk_ids, active):
        provider.release(provider.get(layer_idx, wave))


def test_wave_reads_count_as_misses(olmoe_pack: Path) -> None:
    store = ExpertStore(olmoe_pack)
    slot = BudgetedExpertProvider.slot_sizes(store, torch.float32)
    provider = BudgetedExpertProvider(store, 2 * sum(slot.values()), torch.float32, policy="lru")
    try:
        assert set(provider.capacity.values()) == {2}
        prefill = torch.tensor([[0, 1], [2, 3], [4, 5], [6, 7]])  # 8 active experts, 2 slots: 8 waves
        _run_layer(provider, 0, prefill)
        stats = provider.expert_stats()
        assert stats["expert_requests"] == 8 and stats["expert_misses"] == 8 and stats["expert_hit_rate"] == 0.0
        assert stats["expert_prefetch_issued"] == 0
        # every miss is one read: the hit rate agrees with the bytes read
        assert stats["expert_bytes_read"] == sum(store.entry(0, e).nbytes for e in range(8))
        _run_layer(provider, 0, torch.tensor([[6, 7]]))  # the last wave is resident: two true hits
        stats = provider.expert_stats()
        assert (stats["expert_hits"], stats["expert_misses"]) == (2, 8)
    finally:
        provider.close()


def test_quantized_experts_count_at_stored_size(olmoe: object, olmoe_mixed_pack: Path) -> None:
    store = ExpertStore(olmoe_mixed_pack)
    slot = BudgetedExpertProvider.slot_sizes(store, torch.float32)
    assert slot == {i: store.max_padded_nbytes(i) for i in store.layer_ids}
    total = sum(slot.values()) * NUM_EXPERTS
    provider = BudgetedExpertProvider(store, total // 2, torch.float32, policy="lfru")
    try:
        assert all(c >= NUM_EXPERTS // 2 - 1 for c in provider.capacity.values())
        for layer_idx in store.layer_ids:
            _run_layer(provider, layer_idx, torch.tensor([[0, 3], [2, 3], [1, 7]]))
            weights = provider.get(layer_idx, [3])
            want = store.dequantized(layer_idx, 3, torch.float32)
            assert torch.equal(weights.gate_up[0], want[0]) and torch.equal(weights.down[0], want[1])
            provider.release(weights)
        provider.check()
        assert provider.resident_nbytes() <= total // 2
    finally:
        provider.close()


def _trace(steps: list[dict[int, list[int]]]) -> RoutingTrace:
    trace = RoutingTrace()
    for step in steps:
        trace.begin_step(torch.tensor([0]), [1])
        for layer_idx, ids in step.items():
            trace.record(layer_idx, torch.tensor([ids]), torch.ones(1, len(ids)))
    return trace


def test_capacity_follows_the_trace() -> None:
    # layer 0 reuses two experts; layer 1 cycles through six: the slots should go to layer 1
    steps = [{0: [i % 2, 2 + (i % 2)], 1: [i % 6, (i + 3) % 6]} for i in range(60)]
    trace = _trace(steps)
    curves = hit_curves(trace, [0, 1], 8, "lru")
    assert curves[0][3] == curves[0][7] and curves[1][5] > curves[1][1]
    slot = {0: 10, 1: 10, 2: 10}  # layer 2: never in the trace
    cap = plan_capacity_from_trace(trace, [0, 1, 2], 8, slot, 110, "lru")
    assert sum(cap.values()) * 10 <= 110 and cap[1] >= 6 and cap[0] == 4 and cap[2] >= 1
    even = plan_capacity_from_trace(RoutingTrace(), [0, 1, 2], 8, slot, 110, "lru")
    assert sorted(even.values()) == [3, 4, 4]


def test_preload_is_all_in_ram_on_the_budgeted_path(olmoe_mixed_pack: Path) -> None:
    store = ExpertStore(olmoe_mixed_pack)
    slot = BudgetedExpertProvider.slot_sizes(store, torch.float32)
    provider = BudgetedExpertProvider(store, sum(slot.values()) * NUM_EXPERTS, torch.float32)
    try:
        provider.preload()
        for layer_idx in store.layer_ids:
            _run_layer(provider, layer_idx, torch.tensor([[0, 1], [5, 7], [2, 3]]))
        stats = provider.expert_stats()
        assert stats["expert_hit_rate"] == 1.0 and stats["expert_bytes_read"] == 0
    finally:
        provider.close()
    small = BudgetedExpertProvider(store, sum(slot.values()) * 2, torch.float32)
    try:
        with pytest.raises(ValueError, match="preload needs room"):
            small.preload()
    finally:
        small.close()


def test_step_predictor_fetches_every_layer_at_the_first(olmoe_pack: Path) -> None:
    class Fixed:
        def predict_step(self, x: torch.Tensor) -> dict[int, list[int]]:
            return {layer_idx: [0, 1] for layer_idx in store.layer_ids}

    store = ExpertStore(olmoe_pack)
    slot = BudgetedExpertProvider.slot_sizes(store, torch.float32)
    provider = BudgetedExpertProvider(store, 4 * sum(slot.values()), torch.float32, step_predictor=Fixed())
    try:
        first = store.layer_ids[0]
        _run_layer(provider, first, torch.tensor([[0, 1]]))
        assert all(provider.caches[i].lookup(0) is not None for i in store.layer_ids)  # fetched at layer 0
        for layer_idx in store.layer_ids[1:]:
            _run_layer(provider, layer_idx, torch.tensor([[0, 5]]))
        recall = provider.layer_recall()
        assert recall[first] == 1.0 and all(recall[i] == 0.5 for i in store.layer_ids[1:])
    finally:
        provider.close()
