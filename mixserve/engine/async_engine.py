"""AsyncEngine: one engine thread drives `Engine.step()`; asyncio callers add, abort and stream.

Invariant: only the engine thread touches the `Engine`. Callers hand it work as commands (plain
callables run between steps, in submission order) and read results from per-request asyncio queues.
An exception escaping `Engine.step()` marks the engine dead: every open stream gets the error, new
work is refused, and `healthy` turns False (the server answers 503).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections import deque
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from mixserve.engine.dispatcher import Controller, Dispatcher
from mixserve.engine.engine import Engine, ResumePoint
from mixserve.outputs import RequestOutput
from mixserve.sampling_params import SamplingParams

T = TypeVar("T")


class EngineDeadError(RuntimeError):
    """The engine loop stopped on an internal error or was shut down; no more work is accepted."""


@dataclass
class _QueueSink:
    """Hands a request's deltas to an asyncio queue from the engine thread."""

    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue[RequestOutput | BaseException]

    def put(self, out: RequestOutput) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, out)

    def fail(self, error: BaseException) -> None:
        if not self.loop.is_closed():
            self.loop.call_soon_threadsafe(self.queue.put_nowait, error)


class AsyncEngine:
    """Thread-owning wrapper of an `Engine` for asyncio servers. Call `start()` once, `shutdown()` at the end.

    Outputs are routed by a `Dispatcher` on the engine thread: each request's deltas go to its
    asyncio queue, each controller's to the controller."""

    def __init__(self, engine: Engine, idle_wait_s: float = 0.5) -> None:
        self.engine = engine
        self.dispatcher = Dispatcher(engine)
        self.idle_wait_s = idle_wait_s
        self._commands: deque[Callable[[], None]] = deque()
        self._wake = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.error: str | None = None
        self.stats: dict[str, float] = engine.stats()
        """Snapshot of `Engine.stats()` taken by the engine thread after every step."""

    @property
    def listeners(self) -> list[Callable[[list[RequestOutput]], None]]:
        """Called on the engine thread with every step's outputs (metrics); must be quick and not raise."""
        return self.dispatcher.listeners

    def new_id(self, kind: str = "req") -> str:
        """A fresh request id (see `Dispatcher.new_id`); safe from any thread."""
        return self.dispatcher.new_id(kind)

    # -- lifecycle -----------------------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="mixserve-engine", daemon=True)
        self._thread.start()

    @property
    def healthy(self) -> bool:
        return self.error is None and self._thread is not None and self._thread.is_alive()

    def shutdown(self, timeout_s: float = 10.0) -> None:
        """Abort everything still running, stop the thread and fail open streams."""
        if self._thread is None:
            return
        self._submit(lambda: self.dispatcher.abort_all(EngineDeadError("the server is shutting down")))
        with self._wake:
            self._stopping = True
            self._wake.notify()
        self._thread.join(timeout_s)
        self.dispatcher.fail_all(EngineDeadError("the server is shutting down"))

    # -- calls from any thread ----------------------------------------------------------------
    def call(self, fn: Callable[[Engine], T]) -> concurrent.futures.Future[T]:
        """Run `fn(engine)` on the engine thread between steps; its result or exception lands in the future."""
        future: concurrent.futures.Future[T] = concurrent.futures.Future()
        if not self.healthy:
            future.set_exception(EngineDeadError(self.error or "the engine is not running"))
            return future

        def run() -> None:
            if not future.set_running_or_notify_cancel():
                return
            try:
                future.set_result(fn(self.engine))
            except BaseException as exc:  # noqa: BLE001 - handed to the caller
                future.set_exception(exc)

        self._submit(run)
        return future

    async def add(self, request_id: str, prompt_token_ids: Sequence[int], params: SamplingParams,
                  prompt: str | None = None,
                  queue: asyncio.Queue[RequestOutput | BaseException] | None = None,
                  resume: ResumePoint | None = None) -> asyncio.Queue[RequestOutput | BaseException]:
        """Queue a request; its deltas arrive on the returned queue (or on `queue`, shared by several).
        `resume`: continue a sample produced elsewhere (see `ResumePoint`).

        Raises what `Engine.add_request` raises (RequestError, QueueFullError), with nothing queued.
        """
        queue = queue if queue is not None else asyncio.Queue()
        sink = _QueueSink(asyncio.get_running_loop(), queue)
        await asyncio.wrap_future(self.call(
            lambda engine: self.dispatcher.add(request_id, prompt_token_ids, params, sink, prompt, resume)))
        return queue

    def abort(self, request_id: str) -> None:
        """Abort a request (fire and forget; safe from a cancelled task). Its stream gets the final delta."""
        if self.healthy:
            self._submit(lambda: self.dispatcher.abort(request_id))

    async def stream(self, request_id: str, prompt_token_ids: Sequence[int], params: SamplingParams,
                     prompt: str | None = None) -> AsyncIterator[RequestOutput]:
        """Add a request and yield its deltas until it finishes; aborts it if the consumer stops early."""
        queue = await self.add(request_id, prompt_token_ids, params, prompt)
        finished = False
        try:
            while not finished:
                item = await queue.get()
                if isinstance(item, BaseException):
                    raise item
                finished = item.finished
                yield item
        finally:
            if not finished:
                self.abort(request_id)

    async def run_controller(self, controller: Controller) -> Any:
        """Start `controller` on the engine thread, feed it its requests' outputs, return its result."""
        future: concurrent.futures.Future[Any] = concurrent.futures.Future()

        def finish(result: Any, error: BaseException | None) -> None:
            if future.done():
                return
            if error is not None:
                future.set_exception(error)
            else:
                future.set_result(result)

        await asyncio.wrap_future(self.call(lambda engine: self.dispatcher.start(controller, finish)))
        try:
            return await asyncio.wrap_future(future)
        finally:
            if not future.done():  # the caller went away: stop the controller and its requests
                self._submit(lambda: self.dispatcher.drop(controller, asyncio.CancelledError()))

    # -- engine thread --------------------------------------------------------------------------
    def _submit(self, command: Callable[[], None]) -> None:
        with self._wake:
            self._commands.append(command)
            self._wake.notify()

    def _loop(self) -> None:
        while True:
            with self._wake:
                while not self._commands and not self._stopping and not self.engine.has_unfinished():
                    self._wake.wait(self.idle_wait_s)
                if self._stopping and not self._commands:
                    return
                commands = list(self._commands)
                self._commands.clear()
            for command in commands:
                command()
            if not self.engine.has_unfinished():
                self.stats = self.engine.stats()
                continue
            try:
                outputs = self.engine.step()
            except Exception as exc:  # noqa: BLE001 - a bug in the engine: stop cleanly, tell everyone
                self.error = f"engine step failed: {type(exc).__name__}: {exc}"
                self.dispatcher.fail_all(EngineDeadError(self.error))
                return
            self.stats = self.engine.stats()
            self.dispatcher.deliver(outputs)
