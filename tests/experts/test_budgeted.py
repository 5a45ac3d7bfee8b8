"""The budgeted provider under random workloads: budget and pins hold, weights are always right."""

from __future__ import annotations

from pathlib import Path

import hypothesis.strategies as st
import pytest
import torch
from hypothesis import given, settings

from mixserve.experts.budgeted import BudgetedExpertProvider
from mixserve.experts.cache import plan_capacity
from mixserve.experts.predict import AffinityPredictor
from mixserve.experts.store import ExpertStore

NUM_EXPERTS, TOP_K, HIDDEN = 8, 2, 64


@pytest.fixture(scope="module")
def reference(olmoe_mixed_pack: Path) -> dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]]:
    store = ExpertStore(olmoe_mixed_pack)
    return {(i, e): store.dequantized(i, e, torch.float32) for i in store.layer_ids for e in range(NUM_EXPERTS)}


def provider_for(pack: Path, budget_fraction: float, policy: str, predict: bool) -> BudgetedExpertProvider:
    store = ExpertStore(pack)
    slot = BudgetedExpertProvider.slot_sizes(store, torch.float32)
    minimum, total = sum(slot.values()), sum(slot.values()) * NUM_EXPERTS
    budget = int(minimum + budget_fraction * (total - minimum))
    predictor = AffinityPredictor(store.layer_ids, NUM_EXPERTS, TOP_K) if predict else None
    return BudgetedExpertProvider(store, budget, torch.float32, policy=policy, predictor=predictor, io_threads=2)


@settings(max_examples=40, deadline=None)
@given(data=st.data(), budget_fraction=st.floats(0.0, 1.0), policy=st.sampled_from(["lru", "lfu", "lfru"]),
       predict=st.booleans())
def test_random_workload_keeps_budget_and_weights(
        olmoe_mixed_pack: Path, reference: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]],
        data: st.DataObject, budget_fraction: float, policy: str, predict: bool) -> None:
    provider = provider_for(olmoe_mixed_pack, budget_fraction, policy, predict)
    try:
        for _ in range(data.draw(st.integers(1, 12))):
            num_tokens = data.draw(st.integers(1, 6))
            for layer_idx in provider.layer_ids:
                rows = [data.draw(st.lists(st.integers(0, NUM_EXPERTS - 1), min_size=TOP_K, max_size=TOP_K,
                                           unique=True)) for _ in range(num_tokens)]
                topk_ids = torch.tensor(rows)
                active = sorted(set(topk_ids.flatten().tolist()))
                # Drawn up front: how many waves there are depends on I/O timing (a prefetch skips
                # slots whose read is still in flight), and hypothesis needs the same draws on replay.
                extra = data.draw(st.lists(st.integers(0, NUM_EXPERTS - 1), max_size=NUM_EXPERTS))
                waves = provider.plan(layer_idx, torch.randn(num_tokens, HIDDEN), topk_ids, active)
                assert sorted(e for w in waves for e in w) == active
                assert all(len(w) <= provider.capacity[layer_idx] for w in waves)
                for wave in waves:
                    weights = provider.get(layer_idx, wave)
                    provider.prefetch(layer_idx, extra)  # while pinned: must not evict the wave
                    for e, gu, dn in zip(wave, weights.gate_up, weights.down):
                        want = reference[(layer_idx, e)]
                        assert torch.equal(gu, want[0]) and torch.equal(dn, want[1])
                    provider.release(weights)
                    provider.check()
                    assert provider.resident_nbytes() <= provider.budget_nbytes
        stats = provider.expert_stats()
        assert stats["expert_requests"] == stats["expert_hits"] + stats["expert_inflight_hits"] + stats["expert_misses"]
        assert 0.0 <= stats["expert_hit_rate"] <= 1.0
    finally:
        provider.close()


def test_capacity_planning() -> None:
    slot = {0: 10, 1: 10, 2: 10}
    assert plan_capacity([0, 1, 2], 8, slot, 30) == {0: 1, 1: 1, 2: 1}
    assert plan_capacity([0, 1, 2], 8, slot, 55) == {0: 2, 1: 2, 2: 1}  # remainder to early layers
    assert plan_capacity([0, 1, 2], 8, slot, 10**6) == {0: 8, 1: 8, 2: 8}
    with pytest.raises(ValueError, match="budget of 29 bytes is below the minimum of 30 bytes"):
        plan_capacity([0, 1, 2], 8, slot, 29)


def test_errors_and_stats(olmoe_pack: Path) -> None:
    provider = provider_for(olmoe_pack, 0.0, "lru", False)
    try:
        assert provider.capacity == {0: 1, 1: 1, 2: 1}
        with pytest.raises(ValueError, match="2 experts asked at once, the cache holds 1"):
            provider.get(0, [0, 1])
        waves = provider.plan(0, torch.randn(3, HIDDEN), torch.tensor([[0, 1], [1, 2], [2, 3]]), [0, 1, 2, 3])
        assert waves == [[0], [1], [2], [3]]
        for wave in waves:
            provider.release(provider.get(0, wave))
        stats = provider.expert_stats()
        assert stats["expert_misses"] == 4 and stats["expert_tokens"] == 3
        assert stats["expert_bytes_per_token"] == pytest.approx(4 * ExpertStore(olmoe_pack).entry(0, 0).nbytes / 3)
        provider.reset_stats()
        assert provider.expert_stats()["expert_requests"] == 0
    finally:
        provider.close()
