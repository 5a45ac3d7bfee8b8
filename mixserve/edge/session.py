"""The edge's view of one cloud session: uploads, deferred tokens, resync and standalone fallback.

The edge keeps every hidden state it produced (fp32, `[positions, hidden_size]`), so whatever the
cloud lost (a dropped link, a restart, an eviction) is rebuilt by resending from the position the
cloud names. A deferral that cannot be answered before the deadline returns None and the caller
emits its own token; a late answer is recognised by its position and dropped.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable

import torch

from mixserve.edge.codec import encode_hidden
from mixserve.edge.config import EdgeConfig
from mixserve.edge.frames import ErrorCode, Frame, FrameKind, decode_frame, pack_body, unpack_reply
from mixserve.edge.link import Link, LinkError
from mixserve.edge.sampling import GREEDY, SplitSampling

Reply = tuple[int, float, float, list[tuple[int, float, int]]]
"""The cloud's answer: token, logprob, top probability, logprob entries (id, logprob, rank)."""

_RESEND_CHUNK = 256


class CloudModelMismatch(RuntimeError):
    """The cloud serves another model or split layer (a configuration error, not a link problem)."""


class CloudSession:
    """One sequence's collaboration with the cloud over a shared link holder (`EdgeLink`)."""

    def __init__(self, link: EdgeLink, config: EdgeConfig, model_key: int, sampling: SplitSampling = GREEDY) -> None:
        self.link = link
        self.config = config
        self.key = model_key
        self.sampling = sampling
        self.block = None if sampling.is_default else sampling.to_json()
        """The sampling block every OPEN carries (none: greedy)."""
        self.sid = os.urandom(16)
        self.history: list[torch.Tensor] = []
        self.ids: list[int] = []
        """Input token id of every position (sent along when the cloud's penalties need them)."""
        self.num_positions = 0
        self.num_sent = 0
        """Positions sent on the current connection (the cloud holds them unless it says otherwise)."""
        self.epoch = -1
        """The connection `num_sent` refers to."""

    def add(self, hidden: torch.Tensor, ids: list[int]) -> None:
        """Keep the next positions' hidden states (and input ids) and upload them now if the link is up
        (a new session is opened without waiting for the answer: the cloud holds nothing of it yet)."""
        self.history.append(hidden.detach().float())
        self.ids += ids
        self.num_positions += hidden.shape[0]
        if self.config.naive:
            return
        try:
            if self.epoch == -1 and self.link.ensure():
                self._open()
                self.epoch, self.num_sent = self.link.epoch, 0
            if self.link.is_up and self.epoch == self.link.epoch:
                self._send_from(self.num_sent)
        except LinkError:
            self.link.drop()

    def infer(self, pos: int, suppress: tuple[int, ...] = ()) -> Reply | None:
        """The cloud's token after position `pos` (sampled with `suppress` ids excluded) and its
        logprobs, or None (standalone fallback)."""
        deadline = time.monotonic() + self.config.cloud_timeout_s
        if not self.link.ensure():
            return None
        try:
            if self.config.naive:
                block = None
                if self.block is not None or suppress:
                    block = json.dumps({**json.loads(self.sampling.to_json()), "suppress": list(suppress)}).encode()
                flags, payload = pack_body(block, self.ids if self.sampling.needs_ids else None,
                                           encode_hidden(torch.cat(self.history), self.config.codec))
                self._send(Frame(FrameKind.INFER_FULL, self.sid, self.key, 0, self.num_positions,
                                 self.config.codec, payload, code=flags))
                return self._wait(self.num_positions - 1, deadline, resync=False)
            if self.epoch != self.link.epoch:  # new connection: resume (or rebuild) the session first
                self._open()
                self.epoch, self.num_sent = self.link.epoch, self.num_positions
                held = self._wait_state(deadline)
                if held is None:
                    return None
                self.link.num_rebuilds += held == 0 and self.num_positions > 0  # the cloud lost it
                self._send_from(held)
            self._send(self._infer_frame(pos, suppress))
            return self._wait(pos, deadline, resync=True, suppress=suppress)
        except LinkError:
            self.link.drop()
            return None

    def close(self) -> None:
        if self.link.is_up and self.epoch == self.link.epoch and not self.config.naive:
            try:
                self._send(Frame(FrameKind.CLOSE, self.sid, self.key))
            except LinkError:
                self.link.drop()

    def _open(self) -> None:
        flags, payload = pack_body(self.block, None)
        self._send(Frame(FrameKind.OPEN, self.sid, self.key, count=self.config.max_len, payload=payload, code=flags))

    def _infer_frame(self, pos: int, suppress: tuple[int, ...]) -> Frame:
        flags, payload = pack_body(None, list(suppress) if suppress else None)
        return Frame(FrameKind.INFER, self.sid, self.key, pos, payload=payload, code=flags)

    def _send_from(self, start: int) -> None:
        """Upload positions `[start, num_positions)` in frames of at most `_RESEND_CHUNK` positions."""
        offset, parts = self.num_positions, []
        for chunk in reversed(self.history):  # usually just the newest chunk
            if offset <= start:
                break
            offset -= chunk.shape[0]
            parts.append(chunk)
        rows = torch.cat(parts[::-1])[start - offset:] if parts else torch.empty(0)
        for i in range(0, rows.shape[0], _RESEND_CHUNK):
            part = rows[i:i + _RESEND_CHUNK]
            ids = self.ids[start + i:start + i + part.shape[0]] if self.sampling.needs_ids else None
            flags, payload = pack_body(None, ids, encode_hidden(part, self.config.codec))
            self._send(Frame(FrameKind.UPLOAD, self.sid, self.key, start + i, part.shape[0], self.config.codec,
                             payload, code=flags))
        self.num_sent = self.num_positions

    def _send(self, frame: Frame) -> None:
        self.link.send(frame.encode())

    def _wait_state(self, deadline: float) -> int | None:
        while (frame := self.link.recv_frame(deadline)) is not None:
            if frame.session == self.sid and frame.kind is FrameKind.STATE:
                return min(frame.pos, self.num_positions)
            if frame.session == self.sid and frame.kind is FrameKind.ERROR:
                self._check_error(frame)
                return None
        return None

    def _wait(self, pos: int, deadline: float, resync: bool, suppress: tuple[int, ...] = ()) -> Reply | None:
        """Read frames until the REPLY for `pos`; repair the session on UNKNOWN_SESSION/OUT_OF_ORDER
        (at most twice: a cloud that keeps refusing is treated as unavailable)."""
        repairs = 0
        while (frame := self.link.recv_frame(deadline)) is not None:
            if frame.session != self.sid:
                continue  # a late answer of a finished session
            if frame.kind is FrameKind.REPLY and frame.pos == pos:
                return unpack_reply(frame.payload)
            if frame.kind is not FrameKind.ERROR:
                continue  # a late reply to an earlier deferral, or a STATE already acted on
            self._check_error(frame)
            if frame.count == FrameKind.UPLOAD:
                continue  # the INFER behind it is refused too, and that refusal is repaired (once)
            if not resync or repairs == 2 or frame.code not in (ErrorCode.UNKNOWN_SESSION, ErrorCode.OUT_OF_ORDER):
                return None
            repairs += 1
            if frame.code == ErrorCode.UNKNOWN_SESSION:
                self.link.num_rebuilds += 1
                self._open()
                self._send_from(0)
            else:
                self._send_from(frame.pos)
            self._send(self._infer_frame(pos, suppress))
        return None

    def _check_error(self, frame: Frame) -> None:
        if frame.code == ErrorCode.WRONG_MODEL:
            raise CloudModelMismatch(frame.payload.decode(errors="replace"))


class EdgeLink:
    """The edge's one connection to the cloud, shared by its sessions; reconnects after `retry_interval_s`."""

    def __init__(self, connect: Callable[[], Link] | None, config: EdgeConfig, max_frame_bytes: int) -> None:
        self.connect = connect
        self.config = config
        self.max_frame_bytes = max_frame_bytes
        self.link: Link | None = None
        self.epoch = 0
        self.down_until = 0.0
        self.bytes_sent = 0
        self.bytes_received = 0
        self.num_reconnects = 0
        self.num_rebuilds = 0

    @property
    def is_up(self) -> bool:
        return self.link is not None

    def ensure(self) -> bool:
        """Connected now (connecting if the retry interval has passed)?"""
        if self.link is not None:
            return True
        if self.connect is None or time.monotonic() < self.down_until:
            return False
        try:
            self.link = self.connect()
        except LinkError:
            self.down_until = time.monotonic() + self.config.retry_interval_s
            return False
        self.epoch += 1
        self.num_reconnects += self.epoch > 1
        return True

    def drop(self) -> None:
        if self.link is not None:
            try:
                self.link.close()
            except Exception:  # noqa: BLE001 - closing a broken link may fail in any way
                pass
        self.link = None
        self.down_until = time.monotonic() + self.config.retry_interval_s

    def send(self, data: bytes) -> None:
        if self.link is None:
            raise LinkError("not connected")
        self.link.send(data)
        self.bytes_sent += len(data)

    def recv_frame(self, deadline: float) -> Frame | None:
        """The next well-formed frame before `deadline` (malformed ones are skipped), else None."""
        while self.link is not None and (left := deadline - time.monotonic()) > 0:
            data = self.link.recv(left)
            if data is None:
                return None
            self.bytes_received += len(data)
            try:
                return decode_frame(data, self.max_frame_bytes)
            except ValueError:
                continue
        return None
