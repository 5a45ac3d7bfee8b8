"""The edge <-> cloud wire format: one versioned, checksummed binary frame per WebSocket message.

Layout (little-endian), a 48-byte header, the payload, then a CRC-32 of header + payload:

    magic "MXEC" | version u8 | kind u8 | code u16 | session 16B | model_key u64 |
    pos u32 | count u32 | codec u8 | 3 pad | payload_len u32 | payload | crc32 u32

`model_key` fingerprints the model and split layer (`model_key()`), so a frame from an edge running
another model or split is refused. In edge -> cloud frames `code` holds flags saying which optional
blocks open the payload, in this order: `FLAG_SAMPLING` (u32 length + the JSON `SplitSampling` of the
session: params, seed, prompt length) and `FLAG_IDS` (u32 n + n u32 token ids). Version 2 added the
flags, the sampling block and the logprob entries of REPLY (seeded sampling on the split model).
Frames are decoded whole or not at all: a truncated, oversized,
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
VERSION = 2
_HEADER = struct.Struct("<4sBBH16sQIIB3xI")
_CRC = struct.Struct("<I")
HEADER_BYTES = _HEADER.size + _CRC.size
"""Bytes a frame adds to its payload."""
_REPLY = struct.Struct("<Iff")
_ENTRY = struct.Struct("<IfI")
_U32 = struct.Struct("<I")
FLAG_SAMPLING = 1
"""Edge -> cloud: the payload opens with a sampling block (u32 length + JSON)."""
FLAG_IDS = 2
"""Edge -> cloud: then a token id block (u32 n + n u32): UPLOAD/INFER_FULL the positions' input ids
(penalties need them), INFER the ids suppressed at that position (min_tokens)."""


class FrameKind(enum.IntEnum):
    """What a frame asks or answers (the value is the wire byte)."""

    OPEN = 1
    """edge -> cloud: start or resume `session` (`count`: the most positions it will hold; a sampling
    block, if any, says how the cloud samples it: greedy without one)."""
    UPLOAD = 2
    """edge -> cloud: hidden states of positions `[pos, pos + count)` (no answer unless refused)."""
    INFER = 3
    """edge -> cloud: the token after position `pos` (the cloud catches up to `pos` first)."""
    INFER_FULL = 4
    """edge -> cloud, naive split: the whole context's hidden states, `[0, count)` (with the sampling
    block and ids as for OPEN/UPLOAD); nothing is kept."""
    GENERATE = 5
    """edge -> cloud, cloud-only (split layer 0): payload u32 prompt ids, `count` new tokens, greedy."""
    CLOSE = 6
    """edge -> cloud: forget `session`."""
    STATE = 7
    """cloud -> edge, to OPEN: `pos` = positions the cloud already holds for the session."""
    REPLY = 8
    """cloud -> edge, to INFER / INFER_FULL: the token after `pos` (payload: id u32, logprob f32, top prob
    f32, then (id u32, logprob f32, rank u32) entries: the chosen token's and the best alternatives')."""
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


def pack_reply(token_id: int, logprob: float, top_prob: float,
               entries: list[tuple[int, float, int]] | None = None) -> bytes:
    return _REPLY.pack(token_id, logprob, top_prob) + b"".join(_ENTRY.pack(*e) for e in entries or ())


def unpack_reply(payload: bytes) -> tuple[int, float, float, list[tuple[int, float, int]]]:
    """(token, logprob, top probability, logprob entries (id, logprob, rank))."""
    if len(payload) < _REPLY.size or (len(payload) - _REPLY.size) % _ENTRY.size:
        raise FrameError(ErrorCode.BAD_FRAME, f"reply payload of {len(payload)} bytes, expected {_REPLY.size} "
                                              f"+ a multiple of {_ENTRY.size}")
    token, logprob, top = _REPLY.unpack_from(payload)
    entries = [_ENTRY.unpack_from(payload, off) for off in range(_REPLY.size, len(payload), _ENTRY.size)]
    return int(token), float(logprob), float(top), [(int(t), float(lp), int(r)) for t, lp, r in entries]


def pack_body(sampling: bytes | None, ids: list[int] | None, rest: bytes = b"") -> tuple[int, bytes]:
    """(flags, payload) of an edge -> cloud frame with the optional blocks before `rest`."""
    flags, parts = 0, []
    if sampling is not None:
        flags |= FLAG_SAMPLING
        parts += [_U32.pack(len(sampling)), sampling]
    if ids is not None:
        flags |= FLAG_IDS
        parts += [_U32.pack(len(ids)), pack_ids(ids)]
    return flags, b"".join(parts) + rest


def unpack_body(frame: Frame) -> tuple[bytes | None, list[int] | None, bytes]:
    """(sampling block, ids, the rest of the payload) of an edge -> cloud frame."""
    if frame.code & ~(FLAG_SAMPLING | FLAG_IDS):
        raise FrameError(ErrorCode.BAD_FRAME, f"unknown frame flags {frame.code:#x}")
    data, off = frame.payload, 0

    def take(n: int, what: str) -> bytes:
        nonlocal off
        if off + n > len(data):
            raise FrameError(ErrorCode.BAD_FRAME, f"{frame.kind.name} payload too short for its {what}")
        off += n
        return data[off - n:off]

    sampling = ids = None
    if frame.code & FLAG_SAMPLING:
        (n,) = _U32.unpack(take(4, "sampling block"))
        sampling = take(n, "sampling block")
    if frame.code & FLAG_IDS:
        (n,) = _U32.unpack(take(4, "token ids"))
        ids = unpack_ids(take(4 * n, "token ids"))
    return sampling, ids, data[off:]


def pack_ids(ids: list[int]) -> bytes:
    return struct.pack(f"<{len(ids)}I", *ids)


def unpack_ids(payload: bytes) -> list[int]:
    if len(payload) % 4:
        raise FrameError(ErrorCode.BAD_FRAME, f"token id payload of {len(payload)} bytes is not a multiple of 4")
    return list(struct.unpack(f"<{len(payload) // 4}I", payload))
