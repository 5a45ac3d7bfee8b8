"""Eviction policies in the offline simulator: closed-form cases, and Belady >= every online policy."""

from __future__ import annotations

import hypothesis.strategies as st
import pytest
import torch
from hypothesis import given, settings

from mixserve.experts.policy import BeladyPolicy, LFRUPolicy, LFUPolicy, LRUPolicy, make_policy
from mixserve.experts.simulate import compare_policies, in_waves, simulate_layer
from mixserve.experts.synthetic import SyntheticRouting, SyntheticRoutingConfig
from mixserve.experts.trace import RoutingTrace, TraceStep


def test_lru_lfu_lfru_victims() -> None:
    lru, lfu, lfru = LRUPolicy(), LFUPolicy(), LFRUPolicy(half_life=1.0)
    for t, e in enumerate([1, 1, 1, 2, 3]):
        for p in (lru, lfu, lfru):
            p.touch(e, t)
    assert lru.victim([1, 2, 3], 5) == 1  # least recent
    assert lfu.victim([1, 2, 3], 5) == 2  # fewest uses, then least recent
    assert lfru.victim([1, 2, 3], 5) == 1  # 2^-5 + 2^-4 + 2^-3 < 2^-2 (expert 2)
    slow = LFRUPolicy(half_life=100.0)
    for t, e in enumerate([1, 1, 1, 2, 3]):
        slow.touch(e, t)
    assert slow.victim([1, 2, 3], 5) == 2  # long memory: behaves like LFU
    with pytest.raises(ValueError, match="unknown eviction policy 'mru'"):
        make_policy("mru")


def test_belady_evicts_farthest_next_use() -> None:
    future = [[1], [2], [3], [1], [2], [1]]
    belady = BeladyPolicy(future)
    assert belady.next_use(1, 0) == 3 and belady.next_use(3, 2) == float("inf")
    assert belady.victim([1, 2], 2) == 2
    assert simulate_layer(future, 2, BeladyPolicy(future)).hits == 2  # optimal: 1 (t=3), 1 (t=5)
    assert simulate_layer(future, 2, LRUPolicy()).hits == 1  # only the last 1


def test_waves_split_large_accesses() -> None:
    assert in_waves([[0, 1, 2, 3, 4], [1]], 2) == [[0, 1], [2, 3], [4], [1]]
    with pytest.raises(ValueError, match="capacity is 1"):
        simulate_layer([[0, 1]], 1, LRUPolicy())


def trace_of(steps: list[list[list[int]]]) -> RoutingTrace:
    """steps[t][layer] = that layer's expert ids for one token."""
    trace = RoutingTrace()
    for t, layers in enumerate(steps):
        step = TraceStep(torch.tensor([t]), [1])
        for layer_idx, ids in enumerate(layers):
            step.topk_ids[layer_idx] = torch.tensor([ids])
            step.topk_weights[layer_idx] = torch.full((1, len(ids)), 1.0 / len(ids))
        trace.steps.append(step)
    return trace


@settings(max_examples=150, deadline=None)
@given(data=st.data(), num_experts=st.integers(2, 10), top_k=st.integers(1, 3),
       num_steps=st.integers(1, 40))
def test_belady_beats_every_online_policy(data: st.DataObject, num_experts: int, top_k: int,
                                          num_steps: int) -> None:
    top_k = min(top_k, num_experts)
    ids = st.lists(st.integers(0, num_experts - 1), min_size=top_k, max_size=top_k, unique=True)
    steps = data.draw(st.lists(st.lists(ids, min_size=2, max_size=2), min_size=num_steps, max_size=num_steps))
    capacity = {0: data.draw(st.integers(1, num_experts)), 1: data.draw(st.integers(1, num_experts))}
    results = compare_policies(trace_of(steps), capacity)
    for name in ("lru", "lfu", "lfru"):
        assert results["belady"].hits >= results[name].hits, (name, results)
    total = results["lru"].hits + results["lru"].misses
    assert all(r.hits + r.misses == total for r in results.values())


def test_belady_beats_online_on_synthetic_traces() -> None:
    for alpha, stickiness in ((0.0, 0.0), (1.2, 0.5), (2.0, 0.9)):
        cfg = SyntheticRoutingConfig(tuple(range(4)), 32, 4, zipf_alpha=alpha, stickiness=stickiness, seed=1)
        trace = SyntheticRouting(cfg).trace([64] + [1] * 200)
        results = compare_policies(trace, {i: 12 for i in range(4)})
        assert all(results["belady"].hits >= r.hits for r in results.values()), results


def test_skew_and_locality_raise_hit_rates() -> None:
    def lru_hit_rate(alpha: float, stickiness: float) -> float:
        cfg = SyntheticRoutingConfig((0, 1), 64, 8, zipf_alpha=alpha, stickiness=stickiness, seed=3)
        return compare_policies(SyntheticRouting(cfg).trace([1] * 300), {0: 16, 1: 16}, ["lru"])["lru"].hit_rate

    uniform, skewed, sticky = lru_hit_rate(0.0, 0.0), lru_hit_rate(1.2, 0.0), lru_hit_rate(1.2, 0.7)
    assert uniform < 0.4 < skewed < sticky, (uniform, skewed, sticky)  # uniform: ~16/64 = 0.25
