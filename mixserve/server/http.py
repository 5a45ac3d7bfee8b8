"""The HTTP/1.1 protocol under uvicorn: h11 plus deadlines for slow headers and stalled readers.

uvicorn closes idle keep-alive connections (`timeout_keep_alive`), but any byte resets that timer and a
fresh connection has none, so a client that trickles its headers (or sends nothing) holds a connection
forever, and one that stops reading holds its response forever. `GuardedH11Protocol` adds:

- a header deadline: from connect, and from the end of each response, the next request's complete
  headers must arrive within `header_timeout_s`, however the bytes are spread out;
- a write deadline: a transport whose buffer stays full (the client stopped reading) for
  `write_timeout_s` is closed; the app sees a disconnect and aborts the request.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from mixserve.server.limits import RequestLimits

log = logging.getLogger("mixserve.server")


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with header and write deadlines (set by `guarded_protocol`)."""

    header_timeout_s: float = RequestLimits.header_timeout_s
    write_timeout_s: float = RequestLimits.write_timeout_s

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._header_timer: asyncio.TimerHandle | None = None
        self._write_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_header_deadline()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_timers()
        super().connection_lost(exc)

    def handle_events(self) -> None:
        cycle = self.cycle
        super().handle_events()
        if self.cycle is not cycle and self._header_timer is not None:  # a request's headers arrived
            self._header_timer.cancel()
            self._header_timer = None

    def on_response_complete(self) -> None:
        self._arm_header_deadline()  # before super(): a pipelined request parsed there disarms it
        super().on_response_complete()

    def pause_writing(self) -> None:
        super().pause_writing()
        if self._write_timer is None:
            self._write_timer = self.loop.call_later(self.write_timeout_s, self._close, "stopped reading")

    def resume_writing(self) -> None:
        if self._write_timer is not None:
            self._write_timer.cancel()
            self._write_timer = None
        super().resume_writing()

    def _arm_header_deadline(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
        self._header_timer = self.loop.call_later(self.header_timeout_s, self._close, "sent no complete headers")

    def _cancel_timers(self) -> None:
        for timer in (self._header_timer, self._write_timer):
            if timer is not None:
                timer.cancel()
        self._header_timer = self._write_timer = None

    def _close(self, why: str) -> None:
        if self.transport is not None and not self.transport.is_closing():
            log.info("closing connection from %s: it %s in time", self.client, why)
            self.transport.abort()  # abort, not close: a stalled reader would keep a graceful close waiting


def guarded_protocol(limits: RequestLimits) -> type[GuardedH11Protocol]:
    """A protocol class with these limits' deadlines (uvicorn takes a class, not an instance)."""
    return type("GuardedH11Protocol", (GuardedH11Protocol,), {
        "header_timeout_s": limits.header_timeout_s, "write_timeout_s": limits.write_timeout_s})


def uvicorn_config(app: Any, limits: RequestLimits, **kwargs: Any) -> uvicorn.Config:
    """uvicorn settings that enforce `limits` at the connection level."""
    # uvicorn types timeout_keep_alive as int but only hands it to loop.call_later, which takes a float
    return uvicorn.Config(app, http=guarded_protocol(limits),
                          timeout_keep_alive=limits.keep_alive_timeout_s,  # type: ignore[arg-type]
                          h11_max_incomplete_event_size=limits.max_header_bytes, **kwargs)
