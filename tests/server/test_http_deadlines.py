"""The connection-level write deadline: a client that stops reading a response is disconnected.

An in-process uvicorn server with `uvicorn_config` streams without end to a client whose receive buffer is
tiny and who never reads; once the transport's buffer stays full for `write_timeout_s`, the connection must
be aborted (the client then sees EOF or a reset instead of endless data) and the app must see the disconnect.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from typing import Any

import uvicorn

from mixserve.server.http import uvicorn_config
from mixserve.server.limits import RequestLimits

CHUNK = b"x" * 65536


class EndlessStream:
    """ASGI app: one endless streaming response; records when it learns the client is gone."""

    def __init__(self) -> None:
        self.disconnected = threading.Event()

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return

        async def watch() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass
            self.disconnected.set()

        watcher = asyncio.ensure_future(watch())
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
        for _ in range(100_000):  # bounded: ~6.5 GB if nothing stopped it
            if self.disconnected.is_set():
                break
            await send({"type": "http.response.body", "body": CHUNK, "more_body": True})
        watcher.cancel()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_a_client_that_stops_reading_is_disconnected() -> None:
    app = EndlessStream()
    port = free_port()
    limits = RequestLimits(write_timeout_s=1.0)
    server = uvicorn.Server(uvicorn_config(app, limits, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while not server.started and time.monotonic() < deadline:
            time.sleep(0.05)
        assert server.started
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect(("127.0.0.1", port))
        sock.sendall(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
        # Never read: the server's buffers fill, and the write deadline must fire.
        assert app.disconnected.wait(30), "the app never saw the stalled reader go away"
        sock.settimeout(10)
        ended = False
        start = time.monotonic()
        try:
            while time.monotonic() - start < 20:
                if sock.recv(1 << 20) == b"":
                    ended = True
                    break
        except (ConnectionResetError, TimeoutError):
            ended = True
        sock.close()
        assert ended, "the connection kept delivering data after the write deadline"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
