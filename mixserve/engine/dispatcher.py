"""Dispatcher: the one place that names requests and routes every engine output to its owner.

An engine serves many owners at once: a blocking `LLM.generate` call, a stream, a scaling strategy,
an HTTP request. Whoever drives the loop calls `Dispatcher.step()` (or hands outputs it got from
`Engine.step()` to `deliver`); each output goes to exactly one owner, so one owner never sees, or
drops, another's outputs.

Routing rule (the invariant): an output of request id `rid` belongs to the `Sink` registered under
exactly `rid`; otherwise to the `Controller` whose `controller_id` is the part of `rid` before the
first "/". A controller names every request it creates `{controller_id}/...`, so it may add, fork
and abort requests on the engine freely and still receive all of their outputs. Outputs nobody owns
(a request added behind the dispatcher's back) are dropped.

A controller callback that raises fails that controller only: it is cancelled, its requests are
aborted, and its `on_finish` callback gets the error. Not thread-safe: use it from the engine's thread.
"""

from __future__ import annotations

import functools
import itertools
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from mixserve.engine.engine import Engine, RequestError, ResumePoint
from mixserve.outputs import RequestOutput
from mixserve.sampling_params import SamplingParams


class Sink(Protocol):
    """The owner of one request's outputs (a blocking caller, a stream, an HTTP response)."""

    def put(self, out: RequestOutput) -> None:
        """A delta of the request; the last one has `finished` set."""

    def fail(self, error: BaseException) -> None:
        """The engine died before the request finished."""


class Controller(Protocol):
    """Something that drives several engine requests itself (a scaling strategy, a mixture).

    Between steps the dispatcher calls `start(engine)` once, then `on_output` with every output of
    a request named `{controller_id}/...`, until `done`. Inside those calls it may add, fork, abort
    and release requests. `cancel` aborts what is still in flight (the caller went away)."""

    @property
    def controller_id(self) -> str: ...

    def start(self, engine: Engine) -> None: ...

    def on_output(self, engine: Engine, out: RequestOutput) -> None: ...

    @property
    def done(self) -> bool: ...

    def cancel(self, engine: Engine) -> None: ...

    def result(self) -> Any: ...


FinishCallback = Callable[[Any, BaseException | None], None]
"""Called once per controller: `(result, None)` when done, `(None, error)` when it failed or was dropped."""


@dataclass
class _Running:
    controller: Controller
    on_finish: FinishCallback


class Dispatcher:
    """Names requests, starts controllers and routes `Engine.step()` outputs (see the module doc)."""

    def __init__(self, engine: Engine, namespace: str | None = None) -> None:
        """`namespace` starts every id `new_id` makes (default: random, so that ids from several
        processes, e.g. Ray replicas behind one endpoint, do not collide)."""
        self.engine = engine
        self._sinks: dict[str, Sink] = {}
        self._controllers: dict[str, _Running] = {}
        self._counter = itertools.count()
        self._prefix = uuid.uuid4().hex[:8] if namespace is None else namespace
        self.listeners: list[Callable[[list[RequestOutput]], None]] = []
        """Called with every step's outputs before routing (metrics); must be quick and not raise."""

    # -- naming ---------------------------------------------------------------------------------
    def new_id(self, kind: str = "req") -> str:
        """A request or controller id unique to this dispatcher and unlikely to repeat across processes."""
        return f"{kind}-{self._prefix}{next(self._counter):x}"

    # -- owners ---------------------------------------------------------------------------------
    def add(self, request_id: str, prompt_token_ids: Sequence[int], params: SamplingParams, sink: Sink,
            prompt: str | None = None, resume: ResumePoint | None = None) -> None:
        """Add a request owned by `sink`; raises what `Engine.add_request` raises, registering nothing."""
        if "/" in request_id:
            raise RequestError(f"request_id {request_id!r} must not contain '/' (reserved for controllers)")
        self.engine.add_request(request_id, prompt_token_ids, params, prompt=prompt, resume=resume)
        self._sinks[request_id] = sink

    def start(self, controller: Controller, on_finish: FinishCallback) -> None:
        """Register `controller` and call its `start`; `on_finish` is called when it ends, maybe at once."""
        cid = controller.controller_id
        if not cid or "/" in cid or cid in self._controllers or cid in self._sinks:
            raise RequestError(f"controller_id {cid!r} is empty, contains '/' or is already in use")
        running = _Running(controller, on_finish)
        self._controllers[cid] = running
        self._guard(running, lambda: controller.start(self.engine))

    def abort(self, request_id: str) -> None:
        """Abort a sink's request; its sink gets the final delta (a no-op when it already finished)."""
        final = self.engine.abort_request(request_id)
        if final is not None:
            self.deliver([final])
        self._sinks.pop(request_id, None)

    def drop(self, controller: Controller, error: BaseException | None = None) -> None:
        """Stop a controller: cancel it unless done, abort its requests, then call its `on_finish`."""
        running = self._controllers.pop(controller.controller_id, None)
        if running is None:
            return
        if not controller.done:
            try:
                controller.cancel(self.engine)
            except Exception as exc:  # noqa: BLE001 - still free what it owns below
                error = error or exc
        prefix = controller.controller_id + "/"
        for request_id in [rid for rid in self.engine.groups if rid.startswith(prefix)]:
            self.engine.abort_request(request_id)
        for request_id in [rid for rid in self.engine.paused if rid.startswith(prefix)]:
            self.engine.release_request(request_id)
        if error is None and not controller.done:
            error = RequestError(f"controller {controller.controller_id!r} was stopped before it finished")
        result = None
        if error is None:
            try:
                result = controller.result()
            except Exception as exc:  # noqa: BLE001 - its failure is its caller's
                error = exc
        running.on_finish(result, error)

    # -- the loop -------------------------------------------------------------------------------
    @property
    def num_owners(self) -> int:
        return len(self._sinks) + len(self._controllers)

    def step(self) -> list[RequestOutput]:
        """One `Engine.step()`, its outputs routed; returns them too (for callers that count)."""
        outputs = self.engine.step()
        self.deliver(outputs)
        return outputs

    def deliver(self, outputs: Iterable[RequestOutput]) -> None:
        outputs = list(outputs)
        for listener in self.listeners:
            listener(outputs)
        for out in outputs:
            sink = self._sinks.get(out.request_id)
            if sink is not None:
                if out.finished:
                    del self._sinks[out.request_id]
                sink.put(out)
                continue
            running = self._controllers.get(out.request_id.split("/", 1)[0])
            if running is not None:
                self._guard(running, functools.partial(running.controller.on_output, self.engine, out))

    def fail_all(self, error: BaseException) -> None:
        """The engine is gone: every sink and controller gets `error`; nothing stays registered."""
        sinks, self._sinks = self._sinks, {}
        for sink in sinks.values():
            sink.fail(error)
        controllers, self._controllers = self._controllers, {}
        for running in controllers.values():
            running.on_finish(None, error)

    def abort_all(self, error: BaseException) -> None:
        """Abort every request (sinks get their final delta) and drop every controller with `error`."""
        for request_id in list(self._sinks):
            self.abort(request_id)
        for running in list(self._controllers.values()):
            self.drop(running.controller, error)
        for request_id in list(self.engine.groups):  # requests added behind the dispatcher's back
            self.engine.abort_request(request_id)

    def _guard(self, running: _Running, action: Callable[[], None]) -> None:
        try:
            action()
        except Exception as exc:  # noqa: BLE001 - a failing controller fails its own call only
            self.drop(running.controller, exc)
            return
        if running.controller.done:
            self.drop(running.controller)


def run_until(dispatcher: Dispatcher, finished: Callable[[], bool], what: str) -> None:
    """Step until `finished()`; raises RuntimeError if the engine idles first (a lost request)."""
    while not finished():
        if not dispatcher.engine.has_unfinished():
            raise RuntimeError(f"engine went idle while {what} still waits")
        dispatcher.step()
