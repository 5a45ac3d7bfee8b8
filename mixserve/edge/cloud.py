"""The cloud side: layers `[K, L)` and the final head, with a per-session context manager.

Invariants of a session:
- `num_received` positions have arrived (UPLOAD frames must come in order, each position once);
- `stage.num_computed <= num_received`; the positions in between wait in `pending` and are run in one
  prefill-like pass (lazy catch-up) when an INFER needs them, so every position the edge produced,
  including those it answered itself, has KV in the cloud's layers before the cloud answers;
- a refused frame changes nothing, so after an error the session is still consistent and the edge
  resends from `expected_pos`. An evicted or unknown session is never answered: the edge is told
  UNKNOWN_SESSION and rebuilds it from the hidden states it kept.
"""

from __future__ import annotations

import json
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch

from mixserve.edge.codec import decode_hidden
from mixserve.edge.config import CloudConfig
from mixserve.edge.frames import (
    ErrorCode,
    Frame,
    FrameError,
    FrameKind,
    decode_frame,
    pack_ids,
    pack_reply,
    unpack_body,
    unpack_ids,
)
from mixserve.edge.sampling import GREEDY, SplitSampling, TokenPicker
from mixserve.edge.stage import SequenceStage
from mixserve.models.base import CausalLM

Answer = tuple[int, float, float, list[tuple[int, float, int]]]
"""(token, its logprob, the top probability, logprob entries (id, logprob, rank))."""


@dataclass
class _Session:
    stage: SequenceStage
    num_received: int = 0
    pending: list[torch.Tensor] = field(default_factory=list)
    """Received `[n, hidden_size]` chunks not yet run through the cloud's layers."""
    last_used: float = 0.0
    last: torch.Tensor | None = None
    """`[1, hidden_size]` output of the cloud's layers at the last computed position."""
    sampling: SplitSampling = GREEDY
    ids: list[int] = field(default_factory=list)
    """Input token ids of the received positions (kept when the sampling's penalties need them)."""

    @property
    def num_bytes(self) -> int:
        return self.stage.kv_bytes + sum(p.nbytes for p in self.pending)


@dataclass
class CloudStats:
    """Counters of the cloud's work (all since start)."""

    num_uploaded_positions: int = 0
    num_computed_positions: int = 0
    """Positions run through the cloud's layers (catch-up, naive and cloud-only passes)."""
    num_forward_calls: int = 0
    compute_seconds: float = 0.0
    num_infers: int = 0
    num_sessions_opened: int = 0
    num_evictions: int = 0
    num_errors: int = 0
    bytes_received: int = 0
    bytes_sent: int = 0


class CloudContextManager:
    """Sessions of hidden states and cloud-layer KV caches under a TTL and a memory budget."""

    def __init__(self, model: CausalLM, config: CloudConfig, dtype: torch.dtype = torch.float32,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.model = model
        self.config = config
        self.dtype = dtype
        self.num_layers = model.kv_cache_spec().end
        if not 0 <= config.split_layer < self.num_layers:
            raise ValueError(f"split_layer={config.split_layer} is outside the model's layers [0, {self.num_layers})")
        self.sessions: OrderedDict[bytes, _Session] = OrderedDict()
        self.clock = clock
        self.stats = CloudStats()
        self.picker = TokenPicker()

    @property
    def num_bytes(self) -> int:
        return sum(s.num_bytes for s in self.sessions.values())

    def open(self, session: bytes, max_len: int, sampling: SplitSampling = GREEDY) -> int:
        """Start `session` sampled with `sampling` (or find it); returns the positions already held."""
        self._sweep()
        found = self.sessions.get(session)
        if found is not None:
            self._touch(session, found)
            return found.num_received
        if not 2 <= max_len <= self.config.max_session_len:
            raise FrameError(ErrorCode.BAD_REQUEST, f"session length {max_len} outside [2, "
                                                    f"{self.config.max_session_len}]")
        stage = SequenceStage(self.model, self.config.split_layer, self.num_layers, max_len, self.dtype)
        self._make_room(stage.kv_bytes)
        self.sessions[session] = _Session(stage, last_used=self.clock(), sampling=sampling)
        self.stats.num_sessions_opened += 1
        return 0

    def upload(self, session: bytes, pos: int, hidden: torch.Tensor, ids: list[int] | None = None) -> None:
        """Hidden states of positions `[pos, pos + n)` (and their input token ids); must continue
        exactly where the session is."""
        s = self._get(session)
        if s.sampling.needs_ids and (ids is None or len(ids) != hidden.shape[0]):
            raise FrameError(ErrorCode.BAD_REQUEST, f"upload of {hidden.shape[0]} positions without their token "
                                                    f"ids (this session's penalties need them)", s.num_received)
        if pos != s.num_received:
            raise FrameError(ErrorCode.OUT_OF_ORDER, f"upload at position {pos}, expected {s.num_received}",
                             s.num_received)
        if pos + hidden.shape[0] > s.stage.max_len:
            raise FrameError(ErrorCode.BAD_REQUEST, f"upload to position {pos + hidden.shape[0]} exceeds "
                                                    f"the session length {s.stage.max_len}", s.num_received)
        self._make_room(hidden.nbytes, keep=session)
        s.pending.append(hidden)
        s.num_received += hidden.shape[0]
        if s.sampling.needs_ids and ids is not None:
            s.ids += ids
        self.stats.num_uploaded_positions += hidden.shape[0]

    def infer(self, session: bytes, pos: int, suppress: tuple[int, ...] = ()) -> Answer:
        """The token after position `pos` (the last received), sampled as the session says at
        position `pos + 1` with `suppress` ids excluded."""
        s = self._get(session)
        if pos != s.num_received - 1:
            raise FrameError(ErrorCode.OUT_OF_ORDER, f"infer at position {pos}, but the session holds "
                                                     f"{s.num_received} position(s)", s.num_received)
        if s.pending:
            hidden = self._run(s.stage, torch.cat(s.pending))
            s.pending.clear()
            s.last = hidden[-1:]
        self.stats.num_infers += 1
        assert s.last is not None  # pos >= 0 was received and computed
        return self._answer(s.last, s.sampling, s.ids, pos + 1, suppress)

    def close(self, session: bytes) -> None:
        self.sessions.pop(session, None)

    def infer_full(self, hidden: torch.Tensor, sampling: SplitSampling = GREEDY, ids: list[int] | None = None,
                   suppress: tuple[int, ...] = ()) -> Answer:
        """Naive split: run the cloud layers over a whole context from scratch, keep nothing."""
        if sampling.needs_ids and (ids is None or len(ids) != hidden.shape[0]):
            raise FrameError(ErrorCode.BAD_REQUEST, "INFER_FULL without the context's token ids (penalties "
                                                    "need them)")
        stage = SequenceStage(self.model, self.config.split_layer, self.num_layers, hidden.shape[0], self.dtype)
        return self._answer(self._run(stage, hidden)[-1:], sampling, ids or [], hidden.shape[0], suppress)

    def generate(self, prompt_ids: list[int], max_tokens: int, eos_token_ids: tuple[int, ...]) -> list[int]:
        """Cloud-only baseline: the whole model (split layer 0) decodes greedily on its own."""
        if self.config.split_layer != 0:
            raise FrameError(ErrorCode.BAD_REQUEST, f"GENERATE needs the whole model (split layer 0), "
                                                    f"this cloud holds [{self.config.split_layer}, {self.num_layers})")
        if not prompt_ids or len(prompt_ids) + max_tokens > self.config.max_session_len:
            raise FrameError(ErrorCode.BAD_REQUEST, f"GENERATE of {len(prompt_ids)} prompt + {max_tokens} new "
                                                    f"tokens: need a prompt and at most {self.config.max_session_len}")
        stage = SequenceStage(self.model, 0, self.num_layers, len(prompt_ids) + max_tokens, self.dtype)
        out: list[int] = []
        ids = prompt_ids
        while len(out) < max_tokens:
            start = time.perf_counter()
            token = int(self.model.head(stage.forward(token_ids=ids)[-1:]).argmax(-1))
            self._count(len(ids), start)
            out.append(token)
            if token in eos_token_ids:
                break
            ids = [token]
        return out

    def _run(self, stage: SequenceStage, hidden: torch.Tensor) -> torch.Tensor:
        start = time.perf_counter()
        out = stage.forward(hidden=hidden)
        self._count(hidden.shape[0], start)
        return out

    def _count(self, num_positions: int, start: float) -> None:
        self.stats.num_computed_positions += num_positions
        self.stats.num_forward_calls += 1
        self.stats.compute_seconds += time.perf_counter() - start

    def _answer(self, last: torch.Tensor, sampling: SplitSampling, ids: list[int], position: int,
                suppress: tuple[int, ...]) -> Answer:
        logits = self.model.head(last)[0].float()
        token, entry = self.picker.pick(logits, sampling, ids, position, suppress)
        top = float(torch.softmax(logits, dim=-1).max())
        entries = [(t, lp.logprob, lp.rank) for t, lp in entry.items()]
        return token, entry[token].logprob, top, entries

    def _get(self, session: bytes) -> _Session:
        self._sweep()
        s = self.sessions.get(session)
        if s is None:
            raise FrameError(ErrorCode.UNKNOWN_SESSION, f"unknown or evicted session {session.hex()}; "
                                                        f"open it again and resend from position 0")
        self._touch(session, s)
        return s

    def _touch(self, key: bytes, s: _Session) -> None:
        s.last_used = self.clock()
        self.sessions.move_to_end(key)

    def _sweep(self) -> None:
        now = self.clock()
        for key in [k for k, s in self.sessions.items() if now - s.last_used > self.config.session_ttl_s]:
            del self.sessions[key]
            self.stats.num_evictions += 1

    def _make_room(self, num_bytes: int, keep: bytes | None = None) -> None:
        """Evict least recently used sessions (never `keep`) until `num_bytes` more fit the budget."""
        budget = self.config.memory_budget_bytes
        for key in list(self.sessions):
            if self.num_bytes + num_bytes <= budget:
                return
            if key != keep:
                del self.sessions[key]
                self.stats.num_evictions += 1
        if self.num_bytes + num_bytes > budget:
            raise FrameError(ErrorCode.OVER_BUDGET, f"{num_bytes} more bytes do not fit the cloud's memory "
                                                    f"budget of {budget} bytes")


class CloudService:
    """Frames in, frames out: decodes, checks the model key, dispatches to the context manager and
    turns every refusal into an ERROR frame (the connection and other sessions carry on)."""

    def __init__(self, manager: CloudContextManager, model_key: int, hidden_size: int,
                 eos_token_ids: tuple[int, ...] = ()) -> None:
        self.manager = manager
        self.model_key = model_key
        self.hidden_size = hidden_size
        self.eos_token_ids = eos_token_ids

    def handle(self, data: bytes) -> list[bytes]:
        stats = self.manager.stats
        stats.bytes_received += len(data)
        session, kind = bytes(16), 0
        try:
            frame = decode_frame(data, self.manager.config.max_frame_bytes)
            session, kind = frame.session, int(frame.kind)
            if frame.model_key != self.model_key:
                raise FrameError(ErrorCode.WRONG_MODEL, f"frame for model key {frame.model_key:016x}, this cloud "
                                                        f"serves {self.model_key:016x} (other model or split layer)")
            replies = self._dispatch(frame)
        except FrameError as e:
            stats.num_errors += 1
            replies = [Frame(FrameKind.ERROR, session, self.model_key, e.expected_pos, kind, code=int(e.code),
                             payload=str(e).encode()).encode()]
        stats.bytes_sent += sum(len(r) for r in replies)
        return replies

    def _dispatch(self, frame: Frame) -> list[bytes]:
        m, key, sid = self.manager, self.model_key, frame.session
        if frame.kind is FrameKind.OPEN:
            block, _, _ = unpack_body(frame)
            return [Frame(FrameKind.STATE, sid, key, m.open(sid, frame.count, _sampling(block))).encode()]
        if frame.kind is FrameKind.UPLOAD:
            _, ids, rest = unpack_body(frame)
            m.upload(sid, frame.pos, self._hidden(frame, rest), ids)
            return []
        if frame.kind is FrameKind.INFER:
            _, suppress, _ = unpack_body(frame)
            answer = m.infer(sid, frame.pos, tuple(suppress or ()))
            return [Frame(FrameKind.REPLY, sid, key, frame.pos, payload=pack_reply(*answer)).encode()]
        if frame.kind is FrameKind.INFER_FULL:
            block, ids, rest = unpack_body(frame)
            sampling = _sampling(block)
            excluded = tuple(int(t) for t in json.loads(block).get("suppress", ())) if block else ()
            reply = pack_reply(*m.infer_full(self._hidden(frame, rest), sampling, ids, excluded))
            return [Frame(FrameKind.REPLY, sid, key, frame.count - 1, payload=reply).encode()]
        if frame.kind is FrameKind.GENERATE:
            ids = m.generate(unpack_ids(frame.payload), frame.count, self.eos_token_ids)
            return [Frame(FrameKind.TOKENS, sid, key, payload=pack_ids(ids)).encode()]
        if frame.kind is FrameKind.STATS:
            return [Frame(FrameKind.STATS, sid, key, payload=json.dumps(asdict(m.stats)).encode()).encode()]
        if frame.kind is FrameKind.CLOSE:
            m.close(sid)
            return []
        raise FrameError(ErrorCode.BAD_REQUEST, f"the cloud does not accept {frame.kind.name} frames")

    def _hidden(self, frame: Frame, payload: bytes) -> torch.Tensor:
        if frame.count < 1:
            raise FrameError(ErrorCode.BAD_FRAME, f"{frame.kind.name} frame with {frame.count} positions")
        try:
            return decode_hidden(payload, frame.codec, frame.count, self.hidden_size)
        except ValueError as e:
            raise FrameError(ErrorCode.BAD_FRAME, str(e)) from None


def _sampling(block: bytes | None) -> SplitSampling:
    """The sampling block of a frame (none: greedy); a bad one is refused naming what is wrong."""
    if block is None:
        return GREEDY
    try:
        return SplitSampling.from_json(block)
    except ValueError as e:
        raise FrameError(ErrorCode.BAD_REQUEST, f"bad sampling block: {e}") from None
