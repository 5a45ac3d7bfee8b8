"""ModelPool: budget never exceeded, pinned models never evicted, no double loads, LRU order, stats."""

from __future__ import annotations

import threading
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mixserve.config import ConfigError
from mixserve.mixture.pool import LoadResult, ModelPool, PoolError


class FakeLoader:
    """Exact sizes; records every load/unload and checks the pool's budget after each."""

    def __init__(self, sizes: dict[str, int], delay_s: float = 0.0, fail: set[str] | None = None) -> None:
        self.sizes = sizes
        self.delay_s = delay_s
        self.fail = fail or set()
        self.resident: dict[str, int] = {}
        self.loads: list[str] = []
        self.max_resident = 0
        self.lock = threading.Lock()

    def estimate_bytes(self, name: str) -> int:
        return self.sizes[name]

    def load(self, name: str) -> LoadResult[str]:
        if self.delay_s:
            time.sleep(self.delay_s)
        if name in self.fail:
            raise OSError(f"cannot read {name}.safetensors")
        with self.lock:
            assert name not in self.resident, f"{name} loaded twice"
            self.resident[name] = self.sizes[name]
            self.loads.append(name)
            self.max_resident = max(self.max_resident, sum(self.resident.values()))
        return LoadResult(f"handle:{name}", self.sizes[name])

    def unload(self, name: str, handle: str) -> None:
        assert handle == f"handle:{name}"
        with self.lock:
            del self.resident[name]


def test_lru_eviction_and_stats() -> None:
    loader = FakeLoader({"a": 40, "b": 40, "c": 40})
    pool = ModelPool(["a", "b", "c"], loader, budget_bytes=100)
    with pool.use("a") as h:
        assert h == "handle:a"
    pool.load("b")
    with pool.use("a"):  # a becomes most recently used
        pass
    pool.load("c")  # evicts b (least recently used), not a
    assert [pool.state(n) for n in "abc"] == ["loaded", "unloaded", "loaded"]
    assert pool.stats("b").evictions == 1 and pool.stats("a").loads == 1 and pool.stats("a").uses == 2
    totals = pool.totals()
    assert totals["resident_bytes"] == 80 and totals["loads"] == 3 and totals["evictions"] == 1
    assert totals["bytes_loaded"] == 120
    assert [e.kind for e in pool.events] == ["load", "load", "evict", "load"]


def test_pinned_model_is_never_evicted_and_waiters_get_room() -> None:
    loader = FakeLoader({"a": 60, "b": 60})
    pool = ModelPool(["a", "b"], loader, budget_bytes=100, wait_timeout_s=0.2)
    pool.acquire("a")
    with pytest.raises(PoolError, match="no room") as err:
        pool.acquire("b")
    assert err.value.code == "pool_busy" and pool.state("a") == "loaded"
    got: list[str] = []
    pool.wait_timeout_s = 10
    t = threading.Thread(target=lambda: got.append(pool.acquire("b")))
    t.start()
    time.sleep(0.05)
    assert pool.state("a") == "loaded"  # still pinned: b waits
    pool.release("a")
    t.join(5)
    assert got == ["handle:b"] and pool.state("a") == "unloaded"


def test_concurrent_callers_share_one_load() -> None:
    loader = FakeLoader({"a": 10}, delay_s=0.1)
    pool = ModelPool(["a"], loader, budget_bytes=100)
    handles: list[str] = []

    def use() -> None:
        with pool.use("a") as h:
            handles.append(h)

    threads = [threading.Thread(target=use) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(5)
    assert handles == ["handle:a"] * 8 and loader.loads == ["a"] and pool.stats("a").loads == 1


def test_errors_name_the_model() -> None:
    loader = FakeLoader({"a": 10, "big": 500, "bad": 10}, fail={"bad"})
    pool = ModelPool(["a", "big", "bad"], loader, budget_bytes=100)
    with pytest.raises(PoolError, match="unknown model 'zzz'; known models: a, big, bad") as e1:
        pool.acquire("zzz")
    assert e1.value.code == "model_not_found"
    with pytest.raises(PoolError, match="needs 500 bytes, more than the whole pool budget"):
        pool.acquire("big")
    with pytest.raises(PoolError, match="'bad' failed to load: OSError: cannot read bad.safetensors") as e3:
        pool.acquire("bad")
    assert e3.value.code == "model_load_failed" and pool.state("bad") == "unloaded"
    assert pool.stats("bad").last_error is not None
    with pool.use("a") as h:  # the others keep working
        assert h == "handle:a"
    assert pool.resident_bytes() == 10
    with pytest.raises(ConfigError, match="pool_memory_budget"):
        ModelPool(["a"], loader, budget_bytes=0)


def test_unload_refuses_pinned() -> None:
    pool = ModelPool(["a"], FakeLoader({"a": 10}), budget_bytes=100)
    pool.acquire("a")
    assert pool.unload("a") is False
    pool.release("a")
    assert pool.unload("a") is True and pool.state("a") == "unloaded"
    with pytest.raises(PoolError, match="released more often"):
        pool.release("a")


@settings(max_examples=60, deadline=None)
@given(sizes=st.lists(st.integers(1, 60), min_size=2, max_size=6),
       ops=st.lists(st.tuples(st.booleans(), st.integers(0, 5)), max_size=60))
def test_budget_never_exceeded_random_streams(sizes: list[int], ops: list[tuple[bool, int]]) -> None:
    """Random acquire/release streams: resident bytes stay within budget, pinned models stay loaded."""
    names = [f"m{i}" for i in range(len(sizes))]
    loader = FakeLoader(dict(zip(names, sizes)))
    budget = 100
    pool = ModelPool(names, loader, budget_bytes=budget, wait_timeout_s=0.0)
    held: list[str] = []
    for acquire, i in ops:
        name = names[i % len(names)]
        if acquire:
            try:
                pool.acquire(name)
                held.append(name)
            except PoolError as exc:
                assert exc.code == "pool_busy"
                # refused only when the pinned models leave no room
                pinned = sum(loader.sizes[n] for n in set(held))
                assert pinned + loader.sizes[name] > budget
        elif held:
            pool.release(held.pop(i % len(held)))
        assert pool.resident_bytes() <= budget
        assert sum(loader.resident.values()) <= budget
        for n in held:
            assert pool.state(n) == "loaded"
    assert loader.max_resident <= budget
