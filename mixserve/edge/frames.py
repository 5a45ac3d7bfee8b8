"""The edge <-> cloud wire format: one versioned, checksummed binary frame per WebSocket message.

Layout (little-endian), a 48-byte header, the payload, then a CRC-32 of header + payload:

    magic "MXEC" | version u8 | kind u8 | code u16 | session 16B | model_key u64 |
    pos u32 | count u32 | codec u8 | 3 pad | payload_len u32 | payload | crc32 u32

`model_key` fingerprints the model and split layer (`model_key()`), so a frame from an edge running
another model or split is refused. Frames are decoded whole or not at all: a truncated, oversized,
corrupted, unknown-version or unknown-kind frame raises `FrameError` and changes no state.
"""

from __future__ import annotations

import enum
import hashlib
import json
import struct
import zlib
from dataclasses import dataclass
from typing import Any

from mixserve.edge.codec import Codec

MAGIC = b"MXEC"
VERSION = 1
_HEADER = struct.Struct("<4sBBH16sQIIB3xI")
_CRC = struct.Struct("<I")
HEADER_BYTES = _HEADER.size + _CRC.size
"""Bytes a frame adds to its payload."""
_REPLY = struct.Struct("<Iff")


class FrameKind(enum.IntEnum):
    """What a frame asks or answers (the value is the wire byte)."""

    OPEN = 1
    """edge -> cloud: start or resume `session` (`count`: the most positions it will hold)."""
    UPLOAD = 2
    """edge -> cloud: hidden states of positions `[pos, pos + count)` (no answer unless refused)."""
    INFER = 3
    """edge -> cloud: the token after position `pos` (the cloud catches up to `pos` first)."""
    INFER_FULL = 4
    """edge -> cloud, naive split: the whole context's hidden states, `[0, count)`; nothing is kept."""
    GENERATE = 5
    """edge -> cloud, cloud-only (split layer 0): payload u32 prompt ids, `count` new tokens, greedy."""
    CLOSE = 6
    """edge -> cloud: forget `session`."""
    STATE = 7
    """cloud -> edge, to OPEN: `pos` = positions the cloud already holds for the session."""
    REPLY = 8
    """cloud -> edge, to INFER / INFER_FULL: the token after `pos` (payload: id u32, logprob, top prob)."""
    TOKENS = 9
    """cloud -> edge, to GENERATE: payload u32 token ids."""
    STATS = 11
    """edge -> cloud: ask for the cloud's counters; cloud -> edge: payload JSON `CloudStats`."""
    ERROR = 10
    """cloud -> edge: `code` an `ErrorCode`, `pos` the expected position, `count` the kind of the refused
    frame (0: undecodable), payload a UTF-8 message."""


class ErrorCode(enum.IntEnum):
    BAD_FRAME = 1
    WRONG_MODEL = 2
    UNKNOWN_SESSION = 3
    OUT_OF_ORDER = 4
    TOO_LARGE = 5
    OVER_BUDGET = 6
    BAD_REQUEST = 7


class FrameError(ValueError):
    """A frame that cannot be accepted; `code` says why (sent back as an ERROR frame)."""

    def __init__(self, code: ErrorCode, message: str, expected_pos: int = 0) -> None:
        super().__init__(message)
        self.code = code
        self.expected_pos = expected_pos


@dataclass(frozen=True)
class Frame:
    """One decoded frame (see the module docstring for the fields)."""

    kind: FrameKind
    session: bytes
    model_key: int
    pos: int = 0
    count: int = 0
    codec: Codec = Codec.FP16
    payload: bytes = b""
    code: int = 0

    def encode(self) -> bytes:
        if len(self.session) != 16:
            raise ValueError(f"session id must be 16 bytes, got {len(self.session)}")
        header = _HEADER.pack(MAGIC, VERSION, int(self.kind), self.code, self.session, self.model_key,
                              self.pos, self.count, int(self.codec), len(self.payload))
        body = header + self.payload
        return body + _CRC.pack(zlib.crc32(body))


def decode_frame(data: bytes, max_frame_bytes: int) -> Frame:
    """Bytes -> `Frame`; raises `FrameError` for anything malformed (nothing is half-applied)."""
    if len(data) > max_frame_bytes:
        raise FrameError(ErrorCode.TOO_LARGE, f"frame of {len(data)} bytes exceeds the limit of "
                                              f"{max_frame_bytes} bytes")
    if len(data) < HEADER_BYTES:
        raise FrameError(ErrorCode.BAD_FRAME, f"frame of {len(data)} bytes is shorter than the "
                                              f"{HEADER_BYTES}-byte header")
    magic, version, kind, code, session, key, pos, count, codec, length = _HEADER.unpack_from(data)
    if magic != MAGIC:
        raise FrameError(ErrorCode.BAD_FRAME, f"bad magic {magic!r}: not a mixserve edge frame")
    if version != VERSION:
        raise FrameError(ErrorCode.BAD_FRAME, f"frame version {version} is not supported (this is {VERSION})")
    if len(data) != HEADER_BYTES + length:
        raise FrameError(ErrorCode.BAD_FRAME, f"frame says {length} payload bytes but carries "
                                              f"{len(data) - HEADER_BYTES}")
    (crc,) = _CRC.unpack_from(data, len(data) - _CRC.size)
    if zlib.crc32(data[:-_CRC.size]) != crc:
        raise FrameError(ErrorCode.BAD_FRAME, "frame checksum mismatch (corrupted in transit)")
    try:
        frame_kind, frame_codec = FrameKind(kind), Codec(codec)
    except ValueError as e:
        raise FrameError(ErrorCode.BAD_FRAME, f"unknown frame field: {e}") from None
    payload = bytes(data[_HEADER.size:len(data) - _CRC.size])
    return Frame(frame_kind, session, key, pos, count, frame_codec, payload, code)


def model_key(hf_config: dict[str, Any], split_layer: int) -> int:
    """64-bit fingerprint of a model's config and the split layer (both sides must agree)."""
    text = json.dumps(hf_config, sort_keys=True, default=str) + f"|split={split_layer}"
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little")


def pack_reply(token_id: int, logprob: float, top_prob: float) -> bytes:
    return _REPLY.pack(token_id, logprob, top_prob)


def unpack_reply(payload: bytes) -> tuple[int, float, float]:
    if len(payload) != _REPLY.size:
        raise FrameError(ErrorCode.BAD_FRAME, f"reply payload of {len(payload)} bytes, expected {_REPLY.size}")
    token, logprob, top = _REPLY.unpack(payload)
    return int(token), float(logprob), float(top)


def pack_ids(ids: list[int]) -> bytes:
    return struct.pack(f"<{len(ids)}I", *ids)


def unpack_ids(payload: bytes) -> list[int]:
    if len(payload) % 4:
        raise FrameError(ErrorCode.BAD_FRAME, f"token id payload of {len(payload)} bytes is not a multiple of 4")
    return list(struct.unpack(f"<{len(payload) // 4}I", payload))
