"""`BudgetedExpertProvider`: experts streamed from an `ExpertStore` into per-layer caches under a budget.

Per step and MoE layer the layer calls `plan` (with its input and routing), then `get`/`release` once
per wave:
- `plan` records the prediction recall for this layer, asks the predictor for the next MoE layer's
  experts and starts reading them (low priority) while this layer computes; it returns the waves:
  the whole active set when it fits the layer's cache (decode), else resident experts first and the
  misses in waves of half the capacity, so the next wave loads while the current one computes
  (prefill: each expert read at most once per wave plan).
- `get` pins the wave's experts, reads the misses (all at once, on the I/O threads), waits, and
  returns tensors valid until `release`.
Resident bytes never exceed the budget: slots are preallocated per layer by `plan_capacity` and
`_check` asserts the total after every allocation. All three methods run on one (compute) thread.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from mixserve.experts.cache import LayerCache, Loaded, Slot, plan_capacity
from mixserve.experts.iopool import DEMAND, NEXT_WAVE, PREDICTED, IOPool
from mixserve.experts.policy import EvictionPolicy, make_policy
from mixserve.experts.predict import ExpertPredictor
from mixserve.experts.pregate import StepPredictor
from mixserve.experts.provider import ExpertWeights
from mixserve.experts.quant import decode, decoded_nbytes
from mixserve.experts.stats import ExpertStats
from mixserve.experts.store import ExpertStore


class BudgetedExpertProvider:
    """An `ExpertProvider` over an expert store, a budget, a policy and an optional predictor."""

    def __init__(self, store: ExpertStore, budget_nbytes: int, dtype: torch.dtype, *,
                 policy: str | Callable[[int], EvictionPolicy] = "lfru",
                 predictor: ExpertPredictor | None = None, io_threads: int = 2,
                 capacity: dict[int, int] | None = None, step_predictor: StepPredictor | None = None) -> None:
        """`policy`: a name (lru, lfu, lfru) or a factory layer_idx -> policy (e.g. Belady over a
        recorded trace). `capacity`: slots per layer instead of `plan_capacity` (must fit the budget).
        `step_predictor`: a pre-gating router asked once per step, at the first MoE layer, for every
        layer's experts (all fetched at once); `predictor`: asked per layer for the next one."""
        self.store = store
        self.dtype = dtype
        self.layer_ids = list(store.layer_ids)
        self.num_experts = store.num_experts
        self.budget_nbytes = budget_nbytes
        raw = {i: store.max_padded_nbytes(i) for i in self.layer_ids}
        self.slot_nbytes = slot = self.slot_sizes(store, dtype)
        # Blobs not already in `dtype` stay encoded in their slot and are decoded per `get`.
        self._views = {(i, e): decoded_nbytes(list(store.entry(i, e).layout), dtype) == 0
                       for i in self.layer_ids for e in range(self.num_experts)}
        self.capacity = capacity or plan_capacity(self.layer_ids, self.num_experts, slot, budget_nbytes)
        factory = policy if callable(policy) else (lambda _layer: make_policy(policy))
        self.caches = {i: LayerCache(i, self.capacity[i], raw[i], slot[i], factory(i)) for i in self.layer_ids}
        if sum(c.capacity * c.slot_nbytes for c in self.caches.values()) > budget_nbytes:
            raise ValueError(f"expert cache capacities {self.capacity} exceed the budget of {budget_nbytes} bytes")
        self.predictor = predictor
        self.step_predictor = step_predictor
        self.io = IOPool(io_threads)
        self.stats = ExpertStats(self.layer_ids)
        self._waves: dict[int, list[list[int]]] = {}
        self._predicted: dict[int, set[int]] = {}
        self._wasted_base = 0

    @staticmethod
    def slot_sizes(store: ExpertStore, dtype: torch.dtype) -> dict[int, int]:
        """Bytes of one cache slot per layer: the largest padded blob, as stored. Quantized experts count
        at their stored size: they stay encoded in the slot and are decoded per `get` into tensors that
        live only until `release` (the working set of one wave, outside the budget)."""
        return {i: store.max_padded_nbytes(i) for i in store.layer_ids}

    # ---- ExpertProvider ------------------------------------------------------------------------------

    def plan(self, layer_idx: int, x: torch.Tensor, topk_ids: torch.Tensor, active_ids: list[int]) -> list[list[int]]:
        cache = self.caches[layer_idx]
        if layer_idx == self.layer_ids[0]:
            self.stats.begin_step(x.shape[0])
            if self.step_predictor is not None:
                self._predict_step(x)
        predicted = self._predicted.pop(layer_idx, None)
        if predicted is not None:
            self.stats.record_recall(layer_idx, len(predicted & set(active_ids)), len(active_ids))
        if self.predictor is not None:
            guess = self.predictor.predict(layer_idx, x, topk_ids)
            if guess is not None:
                nxt, ranked = guess
                self._predicted[nxt] = set(ranked)
                self.prefetch(nxt, ranked[:self.caches[nxt].capacity], PREDICTED)
        if len(active_ids) <= cache.capacity:
            waves = [list(active_ids)]
        else:
            resident = [e for e in active_ids if cache.lookup(e) is not None]
            order = resident + [e for e in active_ids if cache.lookup(e) is None]
            size = max(1, cache.capacity // 2)
            waves = [order[:cache.capacity]] if len(resident) >= cache.capacity else []
            start = len(waves[0]) if waves else 0
            waves += [order[i:i + size] for i in range(start, len(order), size)]
        self._waves[layer_idx] = [list(w) for w in waves]
        return waves

    def _predict_step(self, x: torch.Tensor) -> None:
        """Every layer's predicted experts, read now (low priority, into idle slots), nearest layer first."""
        assert self.step_predictor is not None
        for layer_idx, ranked in sorted(self.step_predictor.predict_step(x).items()):
            if layer_idx in self.caches:
                self._predicted[layer_idx] = set(ranked)
                self.prefetch(layer_idx, ranked[:self.caches[layer_idx].capacity], PREDICTED)

    def get(self, layer_idx: int, expert_ids: list[int]) -> ExpertWeights:
        cache = self.caches[layer_idx]
        if len(expert_ids) > cache.capacity:
            raise ValueError(f"layer {layer_idx}: {len(expert_ids)} experts asked at once, the cache holds "
                             f"{cache.capacity}; ask in the waves `plan` returns")
        now = cache.tick()
        keep = set(expert_ids)
        slots = [self._acquire(cache, e, keep, now) for e in expert_ids]
        queued = self._waves.get(layer_idx)
        if queued and queued[0] == list(expert_ids):
            queued.pop(0)
            if queued:
                self.prefetch(layer_idx, queued[0], NEXT_WAVE, keep=keep | set(queued[0]))
        start = time.perf_counter()
        for s in slots:
            self._wait(s)
        self.stats.stall_seconds += time.perf_counter() - start
        loaded = [self._weights(layer_idx, s) for s in slots]
        return ExpertWeights(layer_idx, list(expert_ids), [w[0] for w in loaded], [w[1] for w in loaded])

    def release(self, weights: ExpertWeights) -> None:
        cache = self.caches[weights.layer_idx]
        for e in weights.expert_ids:
            slot = cache.lookup(e)
            assert slot is not None and slot.pins > 0, f"release of unpinned expert {e}"
            slot.pins -= 1

    # ---- loading -------------------------------------------------------------------------------------

    def _acquire(self, cache: LayerCache, expert_id: int, keep: set[int], now: int) -> Slot:
        slot = cache.lookup(expert_id)
        if slot is None:
            slot = self._load(cache, expert_id, keep, DEMAND, wait_for_room=True)
            assert slot is not None
            self.stats.misses += 1
        elif slot.wave_load:
            self.stats.misses += 1  # read for this step's next wave: a miss the wave plan hid, not a hit
        elif slot.future is not None:
            self.stats.inflight_hits += 1
        else:
            self.stats.hits += 1
        slot.wave_load = False
        if slot.prefetched:
            slot.prefetched = False
            self.stats.prefetch_used += 1
        slot.pins += 1
        cache.policy.touch(expert_id, now)
        return slot

    def _load(self, cache: LayerCache, expert_id: int, keep: set[int], priority: int,
              wait_for_room: bool) -> Slot | None:
        slot = cache.take_slot(keep)
        while slot is None and wait_for_room:
            loading = cache.loading_slots(keep)
            if not loading:
                raise RuntimeError(f"layer {cache.layer_idx}: no evictable expert slot (all pinned)")
            start = time.perf_counter()
            self._wait(loading[0])
            self.stats.stall_seconds += time.perf_counter() - start
            slot = cache.take_slot(keep)
        if slot is None:
            return None
        entry = self.store.entry(cache.layer_idx, expert_id)
        raw, layout, dtype = slot.raw, list(entry.layout), self.dtype
        views = self._views[(cache.layer_idx, expert_id)]

        def read() -> Loaded | None:
            self.store.read_into(entry, raw)
            return decode(raw, layout, dtype) if views else None

        cache.assign(slot, expert_id, self.io.submit(priority, read), entry.nbytes, priority == PREDICTED)
        slot.wave_load = priority == NEXT_WAVE
        self.stats.bytes_read += entry.nbytes
        self._check()
        return slot

    def _wait(self, slot: Slot) -> None:
        """Block until the slot's read (if any) finished."""
        if slot.future is not None:
            slot.weights = slot.future.result()
            slot.future = None

    def _weights(self, layer_idx: int, slot: Slot) -> Loaded:
        """A read slot's tensors: cached views, or decoded now from the encoded blob."""
        if slot.weights is not None:
            return slot.weights
        assert slot.expert_id is not None
        return decode(slot.raw, list(self.store.entry(layer_idx, slot.expert_id).layout), self.dtype)

    def prefetch(self, layer_idx: int, expert_ids: list[int], priority: int = PREDICTED,
                 keep: set[int] | None = None) -> None:
        """Start reading `expert_ids` of a layer into idle slots (never evicting a pinned, loading or
        kept expert); experts that find no room are skipped."""
        cache = self.caches[layer_idx]
        keep = set(expert_ids) if keep is None else keep
        for e in expert_ids:
            if cache.lookup(e) is None:
                if self._load(cache, e, keep, priority, wait_for_room=False) is None:
                    return
                self.stats.prefetch_issued += priority == PREDICTED

    def preload(self) -> None:
        """Read every expert now (the budget must hold them all): the all-in-RAM configuration on the
        same code path as a budgeted one, with no reads left for later steps."""
        if any(c.capacity < self.num_experts for c in self.caches.values()):
            raise ValueError(f"preload needs room for all {self.num_experts} experts per layer; "
                             f"capacities are {self.capacity}")
        for layer_idx in self.layer_ids:
            self.prefetch(layer_idx, list(range(self.num_experts)), DEMAND)
            for slot in self.caches[layer_idx].slots:
                self._wait(slot)
        self.reset_stats()

    # ---- accounting ----------------------------------------------------------------------------------

    def resident_nbytes(self) -> int:
        return sum(c.resident_nbytes() for c in self.caches.values())

    def _check(self) -> None:
        assert self.resident_nbytes() <= self.budget_nbytes, (self.resident_nbytes(), self.budget_nbytes)

    def check(self) -> None:
        """Assert every invariant (budget, slot uniqueness); tests call it between steps."""
        self._check()
        for c in self.caches.values():
            c.check()

    def expert_stats(self) -> dict[str, float]:
        """Counters since the last `reset_stats` (see `ExpertStats.as_dict`)."""
        self.stats.prefetch_wasted = self._wasted() - self._wasted_base
        return self.stats.as_dict(self.resident_nbytes(), self.budget_nbytes)

    def layer_recall(self) -> dict[int, float]:
        """Per MoE layer: share of the true active experts the predictor had named (NaN: no prediction)."""
        return self.stats.layer_recall()

    def reset_stats(self) -> None:
        self.stats = ExpertStats(self.layer_ids)
        self._wasted_base = self._wasted()

    def _wasted(self) -> int:
        return sum(c.wasted_prefetches for c in self.caches.values())

    def close(self) -> None:
        self.io.close()
