"""Link drops, slow or restarted clouds, evictions and bad frames: the edge keeps going, nothing it
already emitted changes, the cloud never answers from a wrong context, and sessions get rebuilt."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from mixserve.edge.codec import Codec, encode_hidden
from mixserve.edge.frames import ErrorCode, Frame, FrameKind, decode_frame, unpack_reply
from mixserve.edge.session import CloudModelMismatch
from mixserve.edge.stage import SequenceStage
from tests.edge.conftest import NUM_LAYERS, PROMPT, Split
from tests.edge.test_split import MAX_TOKENS, greedy


def next_token(model: Any, context: list[int]) -> int:
    """The whole model's greedy token after `context` (one fresh prefill)."""
    with torch.inference_mode():
        stage = SequenceStage(model, 0, NUM_LAYERS, 64, torch.float32)
        return int(model.head(stage.forward(token_ids=context)[-1:]).argmax(-1))


def assert_cloud_tokens_follow_the_context(split: Split, tokens: list[int], sources: list[str]) -> None:
    for i, source in enumerate(sources):
        if source == "cloud":
            assert tokens[i] == next_token(split.model, PROMPT + tokens[:i]), i


def test_link_drop_goes_standalone_then_resumes(llama: Split) -> None:
    want = greedy(llama.model, PROMPT, MAX_TOKENS)
    edge, link = llama.edge(llama.cloud(2), 2, tau=1.0, retry_interval_s=0.0)
    assert link is not None

    def toggle(token: int, source: str) -> None:
        n = edge.stats.num_tokens
        link.up = not 3 <= n < 7  # down while tokens 4..7 are decided

    result = edge.generate(PROMPT, MAX_TOKENS, ignore_eos=True, on_token=toggle)
    assert result.sources[:3] == ["cloud"] * 3 and result.token_ids[:3] == want[:3]
    assert result.sources[3:7] == ["standalone"] * 4
    assert result.sources[7:] == ["cloud"] * (MAX_TOKENS - 7)
    # Standalone tokens are the exit head's; the cloud resumed from the context it had plus the resent part.
    assert result.token_ids[3] == greedy(llama.model, PROMPT + want[:3], 1, end=2)[0]
    assert_cloud_tokens_follow_the_context(llama, result.token_ids, result.sources)
    assert edge.link.num_reconnects == 1 and edge.link.num_rebuilds == 0


def test_cloud_restart_rebuilds_the_session(llama: Split) -> None:
    want = greedy(llama.model, PROMPT, MAX_TOKENS)
    edge, link = llama.edge(llama.cloud(2), 2, tau=1.0)
    assert link is not None
    fresh = llama.cloud(2)

    def restart(token: int, source: str) -> None:
        if edge.stats.num_tokens == 5:
            link.service = fresh  # the new cloud knows nothing of the session

    result = edge.generate(PROMPT, MAX_TOKENS, ignore_eos=True, on_token=restart)
    assert result.sources == ["cloud"] * MAX_TOKENS
    assert result.token_ids == want
    assert edge.link.num_rebuilds == 1
    assert fresh.manager.stats.num_uploaded_positions == len(PROMPT) + MAX_TOKENS - 1


def test_ttl_and_memory_budget_evictions_are_rebuilt(llama: Split) -> None:
    want = greedy(llama.model, PROMPT, MAX_TOKENS)
    now = [0.0]
    service = llama.cloud(2, session_ttl_s=10.0)
    service.manager.clock = lambda: now[0]
    edge, _ = llama.edge(service, 2, tau=1.0)

    def tick(token: int, source: str) -> None:
        now[0] += 4.0 if edge.stats.num_tokens != 6 else 11.0  # one gap longer than the TTL

    result = edge.generate(PROMPT, MAX_TOKENS, ignore_eos=True, on_token=tick)
    assert result.token_ids == want and service.manager.stats.num_evictions == 1

    # A budget of one session: opening a second evicts the least recently used.
    one = llama.cloud(2)
    one.manager.open(b"a" * 16, 64)
    kv = one.manager.num_bytes
    one.manager.config = type(one.manager.config)(split_layer=2, memory_budget_bytes=kv + 4096)
    one.manager.open(b"b" * 16, 64)
    assert list(one.manager.sessions) == [b"b" * 16] and one.manager.stats.num_evictions == 1


def test_slow_cloud_falls_back_and_late_answers_are_dropped(llama: Split) -> None:
    # A held-back reply reads as a deadline passed (LocalLink.recv returns None at once), so the
    # deadline itself can be generous: no timing in this test.
    edge, link = llama.edge(llama.cloud(2), 2, tau=1.0, cloud_timeout_s=30.0)
    assert link is not None

    def slow(token: int, source: str) -> None:
        link.delay_replies = 2 <= edge.stats.num_tokens < 5

    result = edge.generate(PROMPT, MAX_TOKENS, ignore_eos=True, on_token=slow)
    assert result.sources[2:5] == ["standalone"] * 3
    assert result.sources[5:] == ["cloud"] * (MAX_TOKENS - 5)
    assert_cloud_tokens_follow_the_context(llama, result.token_ids, result.sources)


def test_edge_without_a_cloud_is_standalone(llama: Split) -> None:
    edge, _ = llama.edge(None, 2, tau=0.5)
    result = edge.generate(PROMPT, MAX_TOKENS, ignore_eos=True)
    assert result.token_ids == greedy(llama.model, PROMPT, MAX_TOKENS, end=2)
    assert set(result.sources) <= {"edge", "standalone"}


def test_wrong_model_is_a_clear_error(llama: Split) -> None:
    edge, _ = llama.edge(llama.cloud(1), 2, tau=1.0)  # the cloud holds another split
    with pytest.raises(CloudModelMismatch, match="other model or split layer"):
        edge.generate(PROMPT, 3, ignore_eos=True)


def _error(replies: list[bytes]) -> Frame:
    assert len(replies) == 1
    frame = decode_frame(replies[0], 1 << 20)
    assert frame.kind is FrameKind.ERROR
    return frame


def test_bad_frames_are_refused_and_the_session_stays_consistent(llama: Split) -> None:
    service = llama.cloud(2, max_frame_bytes=8192)
    key, sid = service.model_key, b"s" * 16
    stage = SequenceStage(llama.model, 0, 2, 64, torch.float32)
    with torch.inference_mode():
        hidden = stage.forward(token_ids=PROMPT)

    def upload(pos: int, rows: torch.Tensor, **kw: Any) -> Frame:
        return Frame(FrameKind.UPLOAD, sid, key, pos, rows.shape[0], Codec.FP32, encode_hidden(rows, Codec.FP32), **kw)

    assert decode_frame(service.handle(Frame(FrameKind.OPEN, sid, key, count=64).encode())[0], 1 << 20).pos == 0
    assert service.handle(upload(0, hidden[:4]).encode()) == []
    good = upload(4, hidden[4:]).encode()
    cases: list[tuple[bytes, ErrorCode, str]] = [
        (b"hello", ErrorCode.BAD_FRAME, "shorter than"),
        (b"XXXX" + good[4:], ErrorCode.BAD_FRAME, "bad magic"),
        (good[:4] + bytes([9]) + good[5:], ErrorCode.BAD_FRAME, "version 9"),
        (good[:-5] + bytes([good[-5] ^ 1]) + good[-4:], ErrorCode.BAD_FRAME, "checksum"),
        (good[:-10], ErrorCode.BAD_FRAME, "payload bytes"),
        (upload(4, hidden[4:]).encode() + bytes(9000), ErrorCode.TOO_LARGE, "exceeds the limit"),
        (Frame(FrameKind.UPLOAD, sid, key, 4, 3, Codec.FP32, b"\0" * 12).encode(), ErrorCode.BAD_FRAME, "expected"),
        (Frame(FrameKind.UPLOAD, sid, key ^ 1, 4, 1, Codec.FP32, b"\0" * 256).encode(), ErrorCode.WRONG_MODEL,
         "model key"),
        (upload(2, hidden[2:]).encode(), ErrorCode.OUT_OF_ORDER, "expected 4"),
        (upload(5, hidden[5:]).encode(), ErrorCode.OUT_OF_ORDER, "expected 4"),
        (Frame(FrameKind.INFER, sid, key, 10).encode(), ErrorCode.OUT_OF_ORDER, "holds 4"),
        (Frame(FrameKind.INFER, b"x" * 16, key, 3).encode(), ErrorCode.UNKNOWN_SESSION, "unknown"),
        (Frame(FrameKind.REPLY, sid, key).encode(), ErrorCode.BAD_REQUEST, "does not accept REPLY"),
    ]
    for data, code, message in cases:
        err = _error(service.handle(data))
        assert err.code == code and message in err.payload.decode(), (code, err.payload)
    assert _error(service.handle(upload(2, hidden[2:]).encode())).pos == 4  # where to resend from
    # Nothing above changed the session: the good frame continues it and the answer is the whole model's.
    assert service.handle(good) == []
    reply = decode_frame(service.handle(Frame(FrameKind.INFER, sid, key, len(PROMPT) - 1).encode())[0], 1 << 20)
    assert reply.kind is FrameKind.REPLY
    assert unpack_reply(reply.payload)[0] == greedy(llama.model, PROMPT, 1)[0]
