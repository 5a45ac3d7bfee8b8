"""Offline cache simulation over routing traces: hit rates of every policy, Belady included.

The access model is the live cache's: per MoE layer, each step's active set is one access; a set
larger than the layer's capacity is split into waves of `capacity` experts (ascending ids) that are
separate accesses; the experts of the current access are pinned (never evicted while it loads the
others). All policies see the same access sequence, so Belady's hit count bounds every online one.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from mixserve.experts.policy import BeladyPolicy, EvictionPolicy, make_policy
from mixserve.experts.trace import RoutingTrace

Accesses = list[list[int]]
"""One layer's access sequence: the sorted expert ids of each access."""


@dataclass(frozen=True)
class SimResult:
    """Hits and misses of one layer (or summed over layers)."""

    hits: int
    """Requested experts already resident."""
    misses: int
    """Requested experts that had to be loaded."""

    @property
    def hit_rate(self) -> float:
        total = self.hits + self.misses
        return self.hits / total if total else 0.0

    def __add__(self, other: SimResult) -> SimResult:
        return SimResult(self.hits + other.hits, self.misses + other.misses)


def layer_accesses(trace: RoutingTrace) -> dict[int, Accesses]:
    """Per layer, the active set of every step that routed through it."""
    out: dict[int, Accesses] = {}
    for step in trace.steps:
        for layer_idx, ids in step.topk_ids.items():
            out.setdefault(layer_idx, []).append(sorted(set(ids.flatten().tolist())))
    return out


def in_waves(accesses: Accesses, capacity: int) -> Accesses:
    """Split every access larger than `capacity` into consecutive waves of at most `capacity` ids."""
    if capacity < 1:
        raise ValueError(f"cache capacity must be >= 1 expert, got {capacity}")
    return [ids[i:i + capacity] for ids in accesses for i in range(0, max(len(ids), 1), capacity)]


def simulate_layer(accesses: Accesses, capacity: int, policy: EvictionPolicy) -> SimResult:
    """Demand caching of one layer with `capacity` slots; `accesses` must already fit (`in_waves`)."""
    resident: set[int] = set()
    hits = misses = 0
    for now, ids in enumerate(accesses):
        if len(ids) > capacity:
            raise ValueError(f"access {now} needs {len(ids)} experts, capacity is {capacity}; use in_waves")
        pinned = set(ids)
        for e in ids:
            if e in resident:
                hits += 1
            else:
                misses += 1
                if len(resident) >= capacity:
                    resident.remove(policy.victim(sorted(resident - pinned), now))
                resident.add(e)
            policy.touch(e, now)
    return SimResult(hits, misses)


PolicyFactory = Callable[[Accesses], EvictionPolicy]
"""Builds a fresh policy for one layer, given that layer's (waved) access sequence."""


def policy_factory(name: str) -> PolicyFactory:
    """`lru`, `lfu`, `lfru` or `belady` (the latter reads the future from the access sequence)."""
    if name == "belady":
        return BeladyPolicy
    make_policy(name)  # validate now
    return lambda _accesses: make_policy(name)


def simulate(trace: RoutingTrace, capacity: dict[int, int], policy: str | PolicyFactory) -> SimResult:
    """Total hits/misses over all layers of `trace` with per-layer `capacity`."""
    factory = policy_factory(policy) if isinstance(policy, str) else policy
    total = SimResult(0, 0)
    for layer_idx, accesses in sorted(layer_accesses(trace).items()):
        waved = in_waves(accesses, capacity[layer_idx])
        total = total + simulate_layer(waved, capacity[layer_idx], factory(waved))
    return total


def compare_policies(trace: RoutingTrace, capacity: dict[int, int],
                     names: Sequence[str] = ("lru", "lfu", "lfru", "belady")) -> dict[str, SimResult]:
    """Every named policy on the same trace and capacities."""
    return {name: simulate(trace, capacity, name) for name in names}
