"""Per-layer cache capacity planned from a routing trace (instead of `plan_capacity`'s even split).

Layers differ: one whose tokens keep reusing a few experts needs few slots, one that spreads over all
experts needs many. From a recorded trace, `hit_curves` simulates each layer's hits at every capacity
(the live cache's access model, `simulate.py`); `plan_capacity_from_trace` starts from one slot per
layer and hands out the rest of the budget to the layer (and number of extra slots) that adds the
most simulated hits per byte (ties: the earlier layer, fewer slots). Layers the trace never saw keep the even plan's
share of what is left.
"""

from __future__ import annotations

from mixserve.experts.cache import plan_capacity
from mixserve.experts.simulate import in_waves, layer_accesses, policy_factory, simulate_layer
from mixserve.experts.trace import RoutingTrace


def hit_curves(trace: RoutingTrace, layer_ids: list[int], num_experts: int, policy: str = "lfru"
               ) -> dict[int, list[int]]:
    """Per layer seen in `trace`: simulated hits with 1 .. num_experts slots (index c-1)."""
    factory = policy_factory(policy)
    curves: dict[int, list[int]] = {}
    for layer_idx, accesses in layer_accesses(trace).items():
        if layer_idx not in layer_ids:
            continue
        curve = []
        for capacity in range(1, num_experts + 1):
            waved = in_waves(accesses, capacity)
            curve.append(simulate_layer(waved, capacity, factory(waved)).hits)
        curves[layer_idx] = curve
    return curves


def plan_capacity_from_trace(trace: RoutingTrace, layer_ids: list[int], num_experts: int,
                             slot_nbytes: dict[int, int], budget_nbytes: int, policy: str = "lfru"
                             ) -> dict[int, int]:
    """Slots per layer within `budget_nbytes`, greedy on simulated hits per byte (module docstring).
    Raises ValueError if one slot per layer does not fit."""
    minimum = sum(slot_nbytes[i] for i in layer_ids)
    capacity = plan_capacity(layer_ids, num_experts, slot_nbytes, min(budget_nbytes, minimum))  # 1 each or raise
    curves = hit_curves(trace, layer_ids, num_experts, policy)
    left = budget_nbytes - minimum
    while True:
        best, best_gain, best_add = None, 0.0, 0
        for i in layer_ids:
            c = capacity[i]
            if i not in curves:
                continue
            # Best average gain over any number of extra slots: hit curves are not concave (LRU
            # thrashes until the cycle fits), so one slot at a time can see no gain at all.
            for add in range(1, min(num_experts - c, left // slot_nbytes[i]) + 1):
                gain = (curves[i][c + add - 1] - curves[i][c - 1]) / (add * slot_nbytes[i])
                if gain > best_gain:
                    best, best_gain, best_add = i, gain, add
        if best is None:
            break
        capacity[best] += best_add
        left -= best_add * slot_nbytes[best]
    unseen = [i for i in layer_ids if i not in curves]
    rest = [i for i in layer_ids if i in curves]
    # What no simulated hit needs: the even plan over unseen layers first, then over every layer.
    for group in (unseen, rest):
        if group and left > 0:
            extra = plan_capacity(group, num_experts, slot_nbytes, left + sum(slot_nbytes[i] for i in group))
            for i in group:
                add = min(extra[i] - 1, num_experts - capacity[i])
                capacity[i] += add
                left -= add * slot_nbytes[i]
    return capacity
