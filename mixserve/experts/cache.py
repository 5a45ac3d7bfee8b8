"""One MoE layer's expert cache: a fixed number of slots, pins, and an eviction policy.

Invariants (checked by `check`):
- at most `capacity` slots exist, each with one aligned read buffer of `raw_nbytes`, so the layer
  never holds more than `capacity * slot_nbytes` bytes of experts;
- an expert is in at most one slot; a pinned slot (in use by a `get` not yet released) or a slot
  whose read is still in flight is never chosen for eviction.

Slots are allocated lazily (a budget of 100% costs memory only as experts are actually used).
All methods run on the compute thread; I/O threads only fill a slot's buffer through its future.
"""

from __future__ import annotations

from concurrent.futures import Future
from dataclasses import dataclass, field

import torch

from mixserve.experts.policy import EvictionPolicy
from mixserve.experts.store import aligned_buffer

Loaded = tuple[torch.Tensor, torch.Tensor]
"""(gate_up, down) of one expert in the compute dtype."""


@dataclass(eq=False)
class Slot:
    """Room for one expert."""

    raw: torch.Tensor
    """Aligned `[raw_nbytes]` uint8 read buffer (gate_up/down may be views into it)."""
    expert_id: int | None = None
    """Expert held (or being read); None when empty."""
    weights: Loaded | None = None
    """Views of the read blob once the read finished (None for encoded blobs, decoded per use)."""
    future: Future[Loaded | None] | None = None
    """The read in flight, if any."""
    pins: int = 0
    """Active `get`s using this slot."""
    prefetched: bool = False
    """Loaded by a prefetch and not requested since (for prefetch accounting)."""
    nbytes_read: int = field(default=0)
    """Bytes of the current expert's read."""
    wave_load: bool = False
    """Read ahead for the next wave of the same step (counts as a miss when requested, not a hit)."""

    @property
    def busy(self) -> bool:
        return self.pins > 0 or (self.future is not None and not self.future.done())


class LayerCache:
    """Slots, lookup and eviction of one layer (see the module docstring)."""

    def __init__(self, layer_idx: int, capacity: int, raw_nbytes: int, slot_nbytes: int,
                 policy: EvictionPolicy) -> None:
        if capacity < 1:
            raise ValueError(f"layer {layer_idx}: cache capacity must be >= 1 expert, got {capacity}")
        self.layer_idx = layer_idx
        self.capacity = capacity
        self.raw_nbytes = raw_nbytes
        self.slot_nbytes = slot_nbytes
        self.policy = policy
        self.slots: list[Slot] = []
        self.where: dict[int, Slot] = {}
        self.now = -1
        self.wasted_prefetches = 0
        """Prefetched experts evicted before any `get` asked for them."""

    def tick(self) -> int:
        """A new access (one `get`) starts; returns its time."""
        self.now += 1
        return self.now

    def lookup(self, expert_id: int) -> Slot | None:
        return self.where.get(expert_id)

    def resident_nbytes(self) -> int:
        return len(self.slots) * self.slot_nbytes

    def take_slot(self, keep: set[int]) -> Slot | None:
        """An empty slot, a fresh one (below capacity), or the policy's victim among idle slots whose
        expert is not in `keep`; None if every slot is busy or kept."""
        for slot in self.slots:
            if slot.expert_id is None:
                return slot
        if len(self.slots) < self.capacity:
            slot = Slot(aligned_buffer(self.raw_nbytes))
            self.slots.append(slot)
            return slot
        idle = [s.expert_id for s in self.slots
                if not s.busy and s.expert_id is not None and s.expert_id not in keep]
        if not idle:
            return None
        victim = self.where[self.policy.victim(sorted(idle), self.now)]
        self.evict(victim)
        return victim

    def loading_slots(self, keep: set[int]) -> list[Slot]:
        """Unpinned slots with a read in flight for an expert not in `keep` (a caller may wait on one)."""
        return [s for s in self.slots if s.pins == 0 and s.future is not None and not s.future.done()
                and s.expert_id not in keep]

    def evict(self, slot: Slot) -> None:
        assert not slot.busy, f"layer {self.layer_idx}: evicting busy expert {slot.expert_id}"
        if slot.expert_id is not None:
            del self.where[slot.expert_id]
        self.wasted_prefetches += slot.prefetched
        slot.expert_id, slot.weights, slot.future, slot.prefetched = None, None, None, False
        slot.wave_load = False

    def assign(self, slot: Slot, expert_id: int, future: Future[Loaded | None], nbytes: int, prefetched: bool) -> None:
        slot.expert_id, slot.weights, slot.future = expert_id, None, future
        slot.prefetched, slot.nbytes_read = prefetched, nbytes
        self.where[expert_id] = slot

    def check(self) -> None:
        """Assert the invariants of the module docstring."""
        assert len(self.slots) <= self.capacity, (self.layer_idx, len(self.slots), self.capacity)
        held = [s.expert_id for s in self.slots if s.expert_id is not None]
        assert len(held) == len(set(held)) == len(self.where), (self.layer_idx, held)
        assert all(self.where[e].expert_id == e for e in self.where)


def plan_capacity(layer_ids: list[int], num_experts: int, slot_nbytes: dict[int, int],
                  budget_nbytes: int) -> dict[int, int]:
    """Slots per layer within `budget_nbytes`: one per layer first, then one more per layer in layer
    order, round after round (early layers get the remainder: their experts are hardest to predict),
    never more than `num_experts`. Raises ValueError if one expert per layer does not fit."""
    minimum = sum(slot_nbytes[i] for i in layer_ids)
    if budget_nbytes < minimum:
        raise ValueError(f"expert memory budget of {budget_nbytes} bytes is below the minimum of {minimum} "
                         f"bytes (one expert per MoE layer for {len(layer_ids)} layers)")
    capacity = {i: 1 for i in layer_ids}
    left = budget_nbytes - minimum
    grew = True
    while grew:
        grew = False
        for i in layer_ids:
            if capacity[i] < num_experts and slot_nbytes[i] <= left:
                capacity[i] += 1
                left -= slot_nbytes[i]
                grew = True
    return capacity
