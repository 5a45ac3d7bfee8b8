"""Eviction policies of one layer's expert cache: LRU, LFU, LFRU, and the Belady oracle.

A policy only ranks; the cache decides what may be evicted (never a pinned or loading expert) and
passes those `candidates` to `victim`. Time `now` counts the layer's accesses (one per `get`), so
policies are comparable across runs and in the offline simulator (`experts/simulate.py`).

- LRU: evict the least recently used (mixtral-offloading).
- LFU: evict the least frequently used over the whole run (counts survive eviction), ties by recency.
- LFRU: evict the lowest combined recency-frequency value (Lee et al.'s LRFU): every use adds 1 to a
  score that halves every `half_life` accesses (default 32: close to LFU on a steady skew, yet a
  hot-but-idle expert fades within a few dozen steps).
- Belady: evict the expert whose next use in the known future is farthest (optimal hit count for a
  known access sequence; the upper bound every online policy is measured against).
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Sequence
from typing import Protocol


class EvictionPolicy(Protocol):
    """Ranks the resident experts of one layer for eviction."""

    def touch(self, expert_id: int, now: int) -> None:
        """`expert_id` was used (a hit, or a load for a request) at access `now`."""
        ...

    def victim(self, candidates: Sequence[int], now: int) -> int:
        """Which of `candidates` (non-empty, all resident and evictable) to evict at access `now`."""
        ...


class LRUPolicy:
    def __init__(self) -> None:
        self.last: dict[int, int] = {}

    def touch(self, expert_id: int, now: int) -> None:
        self.last[expert_id] = now

    def victim(self, candidates: Sequence[int], now: int) -> int:
        return min(candidates, key=lambda e: (self.last.get(e, -1), e))


class LFUPolicy:
    def __init__(self) -> None:
        self.count: dict[int, int] = {}
        self.last: dict[int, int] = {}

    def touch(self, expert_id: int, now: int) -> None:
        self.count[expert_id] = self.count.get(expert_id, 0) + 1
        self.last[expert_id] = now

    def victim(self, candidates: Sequence[int], now: int) -> int:
        return min(candidates, key=lambda e: (self.count.get(e, 0), self.last.get(e, -1), e))


class LFRUPolicy:
    """Score `s(e) = sum over uses u of 2 ** (-(now - u) / half_life)`, kept incrementally."""

    def __init__(self, half_life: float = 32.0) -> None:
        if half_life <= 0:
            raise ValueError(f"LFRU half_life must be > 0, got {half_life}")
        self.decay = math.log(2) / half_life
        self.score: dict[int, float] = {}
        self.last: dict[int, int] = {}

    def _value(self, e: int, now: int) -> float:
        if e not in self.score:
            return 0.0
        return self.score[e] * math.exp(-self.decay * (now - self.last[e]))

    def touch(self, expert_id: int, now: int) -> None:
        if self.last.get(expert_id) == now:
            return  # one access, one count (waves and prefetch may touch twice)
        self.score[expert_id] = self._value(expert_id, now) + 1.0
        self.last[expert_id] = now

    def victim(self, candidates: Sequence[int], now: int) -> int:
        return min(candidates, key=lambda e: (self._value(e, now), self.last.get(e, -1), e))


class BeladyPolicy:
    """Farthest next use, given the layer's whole access sequence (`future[t]` = experts used at t)."""

    def __init__(self, future: Sequence[Sequence[int]]) -> None:
        self.uses: dict[int, list[int]] = {}
        for t, ids in enumerate(future):
            for e in set(ids):
                self.uses.setdefault(e, []).append(t)

    def touch(self, expert_id: int, now: int) -> None:
        pass

    def next_use(self, expert_id: int, now: int) -> float:
        """First access strictly after `now` that uses `expert_id` (inf if none)."""
        times = self.uses.get(expert_id, [])
        i = bisect.bisect_right(times, now)
        return times[i] if i < len(times) else math.inf

    def victim(self, candidates: Sequence[int], now: int) -> int:
        return max(candidates, key=lambda e: (self.next_use(e, now), e))


def make_policy(name: str) -> EvictionPolicy:
    """An online policy by config name (lru, lfu, lfru); Belady needs the future: build it directly."""
    policies: dict[str, type[LRUPolicy] | type[LFUPolicy] | type[LFRUPolicy]] = {
        "lru": LRUPolicy, "lfu": LFUPolicy, "lfru": LFRUPolicy}
    if name not in policies:
        raise ValueError(f"unknown eviction policy {name!r}; expected lru, lfu or lfru")
    return policies[name]()
