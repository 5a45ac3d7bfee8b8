"""A pool of whole models under one memory budget: load on demand, LRU eviction, pinning while in use.

Invariants (checked by tests/mixture/test_pool.py with random request streams):
- resident bytes (loaded + being loaded) never exceed `budget_bytes`;
- a pinned model (one a caller holds through `use()`/`acquire()`) is never evicted;
- a model is never loaded twice at once: a second caller waits for the first load and shares it.

The pool is thread-safe. Loads run outside the pool lock (other models stay usable meanwhile); the bytes
a load will need are reserved first, from the loader's estimate, and corrected to the measured size after.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Generic, Literal, Protocol, TypeVar

from mixserve.config import ConfigError

T = TypeVar("T")
ModelState = Literal["unloaded", "loading", "loaded"]


class PoolError(RuntimeError):
    """A model cannot be made resident (unknown, failed to load, or no room while others are pinned)."""

    def __init__(self, message: str, model: str | None = None, code: str = "pool_error") -> None:
        super().__init__(message)
        self.model = model
        self.code = code


@dataclass
class LoadResult(Generic[T]):
    handle: T
    nbytes: int
    """Measured resident bytes (weights + KV cache + buffers)."""


class ModelLoader(Protocol[T]):
    """Turns a model name into a resident handle and back."""

    def estimate_bytes(self, name: str) -> int:
        """Bytes the model will hold once loaded (reserved before loading)."""

    def load(self, name: str) -> LoadResult[T]: ...

    def unload(self, name: str, handle: T) -> None: ...


@dataclass
class PoolEvent:
    kind: Literal["load", "unload", "evict", "load_failed"]
    model: str
    nbytes: int
    seconds: float
    at: float


@dataclass
class ModelStats:
    loads: int = 0
    unloads: int = 0
    evictions: int = 0
    load_seconds: float = 0.0
    unload_seconds: float = 0.0
    bytes_loaded: int = 0
    uses: int = 0
    last_error: str | None = None


@dataclass
class _Entry(Generic[T]):
    name: str
    state: ModelState = "unloaded"
    handle: Any = None
    nbytes: int = 0
    pins: int = 0
    stats: ModelStats = field(default_factory=ModelStats)


class ModelPool(Generic[T]):
    """Models by name, at most `budget_bytes` resident; least recently used unpinned models go first."""

    def __init__(self, names: list[str], loader: ModelLoader[T], budget_bytes: int,
                 wait_timeout_s: float = 600.0) -> None:
        if budget_bytes <= 0:
            raise ConfigError(f"invalid config pool_memory_budget={budget_bytes!r}: must be > 0 bytes",
                              field="pool_memory_budget")
        if len(set(names)) != len(names):
            raise ConfigError(f"invalid config models={names!r}: names must be unique", field="models")
        self.loader = loader
        self.budget_bytes = budget_bytes
        self.wait_timeout_s = wait_timeout_s
        self._entries: dict[str, _Entry[T]] = {n: _Entry(n) for n in names}
        self._lru: OrderedDict[str, None] = OrderedDict()  # loaded models, least recently used first
        self._cond = threading.Condition()
        self.events: list[PoolEvent] = []
        self.peak_bytes = 0

    # -- queries ----------------------------------------------------------------------------
    @property
    def names(self) -> list[str]:
        return list(self._entries)

    def state(self, name: str) -> ModelState:
        return self._entry(name).state

    def peek(self, name: str) -> T | None:
        """The handle of a loaded model without pinning it (for metrics and shutdown), else None."""
        entry = self._entry(name)
        return entry.handle if entry.state == "loaded" else None  # type: ignore[no-any-return]

    def loaded(self) -> list[str]:
        """Loaded models, least recently used first."""
        with self._cond:
            return [m for m in self._lru if self._entries[m].state == "loaded"]

    def resident_bytes(self) -> int:
        with self._cond:
            return self._resident()

    def stats(self, name: str) -> ModelStats:
        return self._entry(name).stats

    def totals(self) -> dict[str, float]:
        """Pool gauges and counters: resident bytes, loads, evictions, bytes and seconds loading."""
        with self._cond:
            all_stats = [e.stats for e in self._entries.values()]
            return {"resident_bytes": self._resident(), "peak_bytes": self.peak_bytes,
                    "budget_bytes": self.budget_bytes,
                    "loaded_models": sum(e.state == "loaded" for e in self._entries.values()),
                    "loads": sum(s.loads for s in all_stats), "evictions": sum(s.evictions for s in all_stats),
                    "unloads": sum(s.unloads for s in all_stats),
                    "bytes_loaded": sum(s.bytes_loaded for s in all_stats),
                    "load_seconds": sum(s.load_seconds for s in all_stats)}

    # -- use -------------------------------------------------------------------------------------
    @contextmanager
    def use(self, name: str) -> Iterator[T]:
        """The model's handle, loaded if needed and pinned (never evicted) until the block exits."""
        handle = self.acquire(name)
        try:
            yield handle
        finally:
            self.release(name)

    def acquire(self, name: str) -> T:
        """Pin `name` (loading it if needed, waiting for room or for another caller's load) and return it."""
        entry = self._entry(name)
        deadline = time.monotonic() + self.wait_timeout_s
        with self._cond:
            while True:
                if entry.state == "loaded":
                    entry.pins += 1
                    entry.stats.uses += 1
                    self._lru.move_to_end(name)
                    return entry.handle  # type: ignore[no-any-return]
                if entry.state == "unloaded" and self._reserve(entry):
                    break
                if not self._cond.wait(timeout=max(0.0, deadline - time.monotonic())):
                    raise PoolError(f"model {name!r}: no room in the pool within {self.wait_timeout_s}s "
                                    f"(budget {self.budget_bytes} bytes, pinned: {self._pinned()})",
                                    model=name, code="pool_busy")
        return self._load(entry)

    def release(self, name: str) -> None:
        entry = self._entry(name)
        with self._cond:
            if entry.pins <= 0:
                raise PoolError(f"model {name!r} released more often than acquired", model=name)
            entry.pins -= 1
            self._cond.notify_all()

    def load(self, name: str) -> None:
        """Make `name` resident without pinning it (the /models/load endpoint)."""
        self.acquire(name)
        self.release(name)

    def unload(self, name: str) -> bool:
        """Unload `name` now; False when it is pinned or not loaded."""
        entry = self._entry(name)
        with self._cond:
            if entry.state != "loaded" or entry.pins > 0:
                return False
            self._finish_unload(entry, self._detach(entry), "unload")
        return True

    def close(self) -> None:
        """Unload every unpinned model."""
        for name in self.names:
            self.unload(name)

    # -- internals (call with the lock held unless noted) ---------------------------------------
    def _entry(self, name: str) -> _Entry[T]:
        entry = self._entries.get(name)
        if entry is None:
            raise PoolError(f"unknown model {name!r}; known models: {', '.join(self._entries)}",
                            model=name, code="model_not_found")
        return entry

    def _resident(self) -> int:
        return sum(e.nbytes for e in self._entries.values() if e.state != "unloaded")

    def _pinned(self) -> list[str]:
        return [e.name for e in self._entries.values() if e.pins > 0 or e.state == "loading"]

    def _reserve(self, entry: _Entry[T]) -> bool:
        """Evict LRU unpinned models until `entry` fits, then mark it loading. False: wait and retry."""
        need = self.loader.estimate_bytes(entry.name)
        if need > self.budget_bytes:
            raise PoolError(f"model {entry.name!r} needs {need} bytes, more than the whole pool budget "
                            f"({self.budget_bytes} bytes)", model=entry.name, code="model_too_large")
        victims = self._victims(need)
        if victims is None:
            return False
        for victim in victims:
            victim.stats.evictions += 1
            self._finish_unload(victim, self._detach(victim), "evict")
        entry.state, entry.nbytes = "loading", need
        self.peak_bytes = max(self.peak_bytes, self._resident())
        return True

    def _victims(self, need: int) -> list[_Entry[T]] | None:
        free = self.budget_bytes - self._resident()
        victims: list[_Entry[T]] = []
        for name in self._lru:
            if free >= need:
                break
            cand = self._entries[name]
            if cand.pins == 0:
                victims.append(cand)
                free += cand.nbytes
        return victims if free >= need else None

    def _detach(self, entry: _Entry[T]) -> Any:
        handle, entry.handle = entry.handle, None
        entry.state = "unloaded"
        self._lru.pop(entry.name, None)
        return handle

    def _finish_unload(self, entry: _Entry[T], handle: Any, kind: Literal["unload", "evict"]) -> None:
        # Unloading under the lock keeps the budget exact: the bytes are gone before others reserve them.
        start = time.perf_counter()
        self.loader.unload(entry.name, handle)
        seconds = time.perf_counter() - start
        entry.stats.unloads += 1
        entry.stats.unload_seconds += seconds
        self.events.append(PoolEvent(kind, entry.name, entry.nbytes, seconds, time.monotonic()))
        entry.nbytes = 0
        self._cond.notify_all()

    def _load(self, entry: _Entry[T]) -> T:
        """Run the loader outside the lock; publish the handle pinned once, or roll the reservation back."""
        start = time.perf_counter()
        try:
            result = self.loader.load(entry.name)
        except BaseException as exc:
            with self._cond:
                entry.state, entry.nbytes = "unloaded", 0
                entry.stats.last_error = f"{type(exc).__name__}: {exc}"
                self.events.append(PoolEvent("load_failed", entry.name, 0, time.perf_counter() - start,
                                             time.monotonic()))
                self._cond.notify_all()
            raise PoolError(f"model {entry.name!r} failed to load: {type(exc).__name__}: {exc}",
                            model=entry.name, code="model_load_failed") from exc
        seconds = time.perf_counter() - start
        with self._cond:
            entry.state, entry.handle, entry.nbytes = "loaded", result.handle, result.nbytes
            entry.pins += 1
            entry.stats.uses += 1
            entry.stats.loads += 1
            entry.stats.load_seconds += seconds
            entry.stats.bytes_loaded += result.nbytes
            entry.stats.last_error = None
            self._lru[entry.name] = None
            self.events.append(PoolEvent("load", entry.name, result.nbytes, seconds, time.monotonic()))
            self._trim_after_load(entry)
            self.peak_bytes = max(self.peak_bytes, self._resident())
            self._cond.notify_all()
            return result.handle

    def _trim_after_load(self, entry: _Entry[T]) -> None:
        """The measured size exceeded the estimate: evict others (never `entry`, now pinned) to fit again."""
        over = self._resident() - self.budget_bytes
        if over <= 0:
            return
        for name in list(self._lru):
            cand = self._entries[name]
            if over <= 0:
                break
            if cand is entry or cand.pins > 0:
                continue
            over -= cand.nbytes
            cand.stats.evictions += 1
            self._finish_unload(cand, self._detach(cand), "evict")

