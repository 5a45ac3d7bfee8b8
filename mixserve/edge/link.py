"""The edge <-> cloud link: a `Link` seam, an in-process link for tests, and WebSocket client/server.

Why WebSocket (the `websockets` library): one long-lived, ordered, full-duplex connection per edge
carries binary frames both ways with no per-frame request overhead. Uploads are fire-and-forget
(only INFER, OPEN and refusals are answered), and message order is what makes "each position once,
in order" checkable. HTTP/2 would need a streaming request per session; gRPC would add a code
generator and protobuf for what is a fixed 48-byte header. Per-message compression is off: hidden
states do not compress and deflate would cost CPU on both sides.
"""

from __future__ import annotations

import queue
import threading
from collections import deque
from collections.abc import Callable
from typing import Protocol

from websockets.exceptions import ConnectionClosed
from websockets.sync.client import ClientConnection, connect
from websockets.sync.server import Server, ServerConnection, serve

from mixserve.edge.cloud import CloudService


class LinkError(ConnectionError):
    """The link is down (refused, closed or broken)."""


class Link(Protocol):
    """An ordered, message-preserving duplex channel of frames."""

    def send(self, data: bytes) -> None:
        """Queue one frame; raises LinkError when the link is known to be down."""
        ...

    def recv(self, timeout: float) -> bytes | None:
        """The next frame from the cloud, or None after `timeout` seconds; LinkError when down."""
        ...

    def close(self) -> None:
        ...


class LocalLink:
    """In-process link straight into a `CloudService` (tests): `up = False` makes it fail like a dropped
    connection, `delay_replies = True` holds replies back like a cloud slower than any deadline."""

    def __init__(self, service: CloudService) -> None:
        self.service = service
        self.replies: deque[bytes] = deque()
        self.up = True
        self.delay_replies = False

    def send(self, data: bytes) -> None:
        if not self.up:
            raise LinkError("local link is down")
        self.replies.extend(self.service.handle(data))

    def recv(self, timeout: float) -> bytes | None:
        if not self.up:
            raise LinkError("local link is down")
        if self.delay_replies or not self.replies:
            return None
        return self.replies.popleft()

    def close(self) -> None:
        self.replies.clear()


class WebSocketLink:
    """Client side over `websockets`; a sender thread writes frames so uploads overlap the edge's compute."""

    def __init__(self, url: str, open_timeout: float = 5.0, max_frame_bytes: int = 64 << 20) -> None:
        try:
            # legacy=True: a connection object we own and close (websockets >= 16 asks to say so).
            self.ws: ClientConnection = connect(url, open_timeout=open_timeout, compression=None,
                                                max_size=2 * max_frame_bytes, legacy=True)
        except (OSError, TimeoutError, ConnectionClosed) as e:
            raise LinkError(f"cannot reach the cloud at {url}: {e}") from e
        self.outbox: queue.Queue[bytes | None] = queue.Queue()
        self.error: Exception | None = None
        self.sender = threading.Thread(target=self._send_loop, daemon=True, name="edge-uplink")
        self.sender.start()

    def _send_loop(self) -> None:
        while (data := self.outbox.get()) is not None:
            try:
                self.ws.send(data)
            except (ConnectionClosed, OSError) as e:
                self.error = e
                return

    def send(self, data: bytes) -> None:
        if self.error is not None or not self.sender.is_alive():
            raise LinkError(f"link to the cloud is down: {self.error}")
        self.outbox.put(data)

    def recv(self, timeout: float) -> bytes | None:
        try:
            msg = self.ws.recv(timeout=timeout)
        except TimeoutError:
            return None
        except (ConnectionClosed, OSError) as e:
            raise LinkError(f"link to the cloud is down: {e}") from e
        if isinstance(msg, str):
            raise LinkError("the cloud sent a text message; expected binary frames")
        return msg

    def close(self) -> None:
        self.outbox.put(None)
        self.sender.join(timeout=2.0)
        self.ws.close()


def websocket_connector(url: str, open_timeout: float = 5.0) -> Callable[[], Link]:
    return lambda: WebSocketLink(url, open_timeout)


def make_cloud_server(service: CloudService, host: str, port: int) -> Server:
    """A WebSocket server feeding every binary message to `service` (one model forward at a time)."""
    lock = threading.Lock()

    def handler(ws: ServerConnection) -> None:
        try:
            for msg in ws:
                if isinstance(msg, str):
                    ws.close(1003, "binary frames only")
                    return
                with lock:
                    replies = service.handle(msg)
                for reply in replies:
                    ws.send(reply)
        except ConnectionClosed:
            pass

    return serve(handler, host, port, compression=None, max_size=2 * service.manager.config.max_frame_bytes)
