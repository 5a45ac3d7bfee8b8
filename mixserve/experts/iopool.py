"""Background I/O threads with priorities: demand loads jump ahead of queued prefetches.

`os.preadv` and torch's conversion kernels release the GIL, so reads overlap with the matmuls of
the calling thread. A plain ThreadPoolExecutor is FIFO: a prefill that predicts a whole next layer
would queue its own current-layer misses behind those guesses; here lower priority values run first.
"""

from __future__ import annotations

import itertools
import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

DEMAND = 0
"""A load the compute thread is (or will be right away) waiting for."""
NEXT_WAVE = 1
"""The next prefill wave of the layer being computed."""
PREDICTED = 2
"""A guess for a later layer."""


class IOPool:
    """`submit(priority, fn)` -> Future; `num_threads` daemon workers; `close` drains and joins."""

    def __init__(self, num_threads: int) -> None:
        if num_threads < 1:
            raise ValueError(f"io_threads must be >= 1, got {num_threads}")
        self._queue: queue.PriorityQueue[tuple[int, int, Future[Any] | None, Callable[[], Any] | None]] = (
            queue.PriorityQueue())
        self._seq = itertools.count()
        self._threads = [threading.Thread(target=self._work, daemon=True, name=f"mixserve-io-{i}")
                         for i in range(num_threads)]
        for t in self._threads:
            t.start()

    def submit(self, priority: int, fn: Callable[[], Any]) -> Future[Any]:
        future: Future[Any] = Future()
        self._queue.put((priority, next(self._seq), future, fn))
        return future

    def _work(self) -> None:
        while True:
            _, _, future, fn = self._queue.get()
            if future is None or fn is None:
                return
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(fn())
            except BaseException as exc:  # handed to the waiting thread, which re-raises it
                future.set_exception(exc)

    def close(self) -> None:
        for _ in self._threads:
            self._queue.put((1 << 30, next(self._seq), None, None))
        for t in self._threads:
            t.join()
