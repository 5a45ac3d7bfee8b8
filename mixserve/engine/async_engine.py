"""AsyncEngine: one engine thread drives `Engine.step()`; asyncio callers add, abort and stream.

Invariant: only the engine thread touches the `Engine`. Callers hand it work as commands (plain
callables run between steps, in submission order) and read results from per-request asyncio queues.
An exception escaping `Engine.step()` marks the engine dead: every open stream gets the error, new
work is refused, and `healthy` turns False (the server answers 503).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import threading
from collections import deque
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from mixserve.engine.engine import Engine
from mixserve.outputs import RequestOutput
from mixserve.sampling_params import SamplingParams

T = TypeVar("T")


class EngineDeadError(RuntimeError):
    """The engine loop stopped on an internal error or was shut down; no more work is accepted."""


class Controller(Protocol):
    """Something that drives several engine requests itself (a scaling strategy), on the engine thread."""

    def start(self, engine: Engine) -> None: ...

    def on_output(self, engine: Engine, out: RequestOutput) -> None: ...

    def owns(self, request_id: str) -> bool: ...

    @property
    def done(self) -> bool: ...

    def cancel(self, engine: Engine) -> None:
        """Abort everything still in flight (the caller went away or a callback failed)."""

    def result(self) -> Any: ...


@dataclass
class _Sink:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue[RequestOutput | BaseException]


@dataclass
class _Running:
    controller: Controller
    future: concurrent.futures.Future[Any]


class AsyncEngine:
    """Thread-owning wrapper of an `Engine` for asyncio servers. Call `start()` once, `shutdown()` at the end."""

    def __init__(self, engine: Engine, idle_wait_s: float = 0.5) -> None:
        self.engine = engine
        self.idle_wait_s = idle_wait_s
        self._commands: deque[Callable[[], None]] = deque()
        self._wake = threading.Condition()
        self._sinks: dict[str, _Sink] = {}
        self._controllers: list[_Running] = []
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.error: str | None = None
        self.stats: dict[str, float] = engine.stats()
        """Snapshot of `Engine.stats()` taken by the engine thread after every step."""
        self.listeners: list[Callable[[list[RequestOutput]], None]] = []
        """Called on the engine thread with every step's outputs (metrics); must be quick and not raise."""

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
        self._submit(self._abort_all)
        with self._wake:
            self._stopping = True
            self._wake.notify()
        self._thread.join(timeout_s)
        self._fail_all(EngineDeadError("the server is shutting down"))

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
                  ) -> asyncio.Queue[RequestOutput | BaseException]:
        """Queue a request; its deltas arrive on the returned queue (or on `queue`, shared by several).

        Raises what `Engine.add_request` raises (RequestError, QueueFullError), with nothing queued.
        """
        queue = queue if queue is not None else asyncio.Queue()
        sink = _Sink(asyncio.get_running_loop(), queue)

        def add(engine: Engine) -> None:
            engine.add_request(request_id, prompt_token_ids, params, prompt=prompt)
            self._sinks[request_id] = sink

        await asyncio.wrap_future(self.call(add))
        return queue

    def abort(self, request_id: str) -> None:
        """Abort a request (fire and forget; safe from a cancelled task). Its stream gets the final delta."""
        if self.healthy:
            self._submit(lambda: self._dispatch([o for o in [self.engine.abort_request(request_id)] if o]))

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

        def start(engine: Engine) -> None:
            running = _Running(controller, future)
            self._controllers.append(running)
            self._guard(running, lambda: controller.start(engine))

        await asyncio.wrap_future(self.call(start))
        try:
            return await asyncio.wrap_future(future)
        finally:
            if not future.done():  # the caller went away: stop the controller and its requests
                self._submit(lambda: self._drop(controller, None))

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
                self._fail_all(EngineDeadError(self.error))
                return
            self.stats = self.engine.stats()
            self._dispatch(outputs)

    def _dispatch(self, outputs: list[RequestOutput]) -> None:
        for listener in self.listeners:
            listener(outputs)
        for out in outputs:
            sink = self._sinks.get(out.request_id)
            if sink is not None:
                sink.loop.call_soon_threadsafe(sink.queue.put_nowait, out)
                if out.finished:
                    del self._sinks[out.request_id]
                continue
            for running in list(self._controllers):
                if running.controller.owns(out.request_id):
                    self._guard(running, functools.partial(running.controller.on_output, self.engine, out))
                    break

    def _guard(self, running: _Running, action: Callable[[], None]) -> None:
        """Run a controller callback; finish its future when it is done or raises."""
        try:
            action()
        except Exception as exc:  # noqa: BLE001 - a failing strategy fails its own call only
            self._drop(running.controller, exc)
            return
        if running.controller.done:
            self._drop(running.controller, None)

    def _drop(self, controller: Controller, error: BaseException | None) -> None:
        for running in [r for r in self._controllers if r.controller is controller]:
            self._controllers.remove(running)
            if not controller.done:
                try:
                    controller.cancel(self.engine)
                except Exception as exc:  # noqa: BLE001 - still free what it owns below
                    error = error or exc
            for request_id in [rid for rid in self.engine.groups if controller.owns(rid)]:
                self.engine.abort_request(request_id)
            if running.future.done():
                continue
            if error is not None:
                running.future.set_exception(error)
            else:
                try:
                    running.future.set_result(controller.result() if controller.done else None)
                except Exception as exc:  # noqa: BLE001
                    running.future.set_exception(exc)

    def _abort_all(self) -> None:
        for request_id in list(self.engine.groups):
            self._dispatch([o for o in [self.engine.abort_request(request_id)] if o])
        for running in list(self._controllers):
            self._drop(running.controller, EngineDeadError("the server is shutting down"))

    def _fail_all(self, error: BaseException) -> None:
        sinks, self._sinks = self._sinks, {}
        for sink in sinks.values():
            if not sink.loop.is_closed():
                sink.loop.call_soon_threadsafe(sink.queue.put_nowait, error)
        for running in self._controllers:
            if not running.future.done():
                running.future.set_exception(error)
        self._controllers = []
