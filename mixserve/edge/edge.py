"""The edge side: layers `[0, K)`, an early-exit head at layer K, and the decision per token.

For every new position the edge runs its layers (so its own KV is always complete), uploads the
hidden state to the cloud's context manager, and reads the exit head (by default the model's own
final norm + LM head applied to layer K's input). If the head's top probability is >= τ the edge
emits that token; otherwise it asks the cloud for the token after this position, and if the cloud
does not answer in time it emits its own token anyway (standalone). Exits happen only at the
partition boundary, so no layer ever misses a position's KV: the cloud catches up every position,
including those the edge answered, before it answers.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from mixserve.edge.config import DEFAULT_MAX_FRAME_BYTES, EdgeConfig
from mixserve.edge.frames import model_key
from mixserve.edge.link import Link
from mixserve.edge.sampling import GREEDY, SplitSampling, TokenPicker
from mixserve.edge.session import CloudSession, EdgeLink, Reply
from mixserve.edge.stage import SequenceStage
from mixserve.models.base import CausalLM
from mixserve.outputs import Logprob, TokenLogprobs

ExitHead = Callable[[torch.Tensor], torch.Tensor]
"""`[n, hidden_size]` layer-K hidden states -> `[n, vocab_size]` logits."""


@dataclass
class EdgeStats:
    """Where each token was decided, and what the link carried (all since start)."""

    num_tokens: int = 0
    num_exit: int = 0
    """Tokens the exit head was confident about (top probability >= τ)."""
    num_cloud: int = 0
    """Deferred tokens the cloud answered."""
    num_standalone: int = 0
    """Deferred tokens the cloud did not answer in time (the edge's own token was emitted)."""
    cloud_wait_s: float = 0.0
    edge_compute_s: float = 0.0

    @property
    def exit_rate(self) -> float:
        """Share of tokens decided at the edge (confident exits and standalone fallbacks)."""
        return (self.num_exit + self.num_standalone) / max(self.num_tokens, 1)


@dataclass
class EdgeResult:
    """One generated sequence."""

    token_ids: list[int]
    sources: list[str]
    """Per token: "edge" (confident exit), "cloud" or "standalone" (deferred, cloud unavailable)."""
    exit_probs: list[float]
    """Per token: the exit head's top probability (of the processed distribution, see `sampling`)."""
    finish_reason: str
    logprobs: list[TokenLogprobs] = field(default_factory=list)
    """Per token: raw logprob entries of the distribution that decided it (exit head or full model)."""
    usage: dict[str, Any] = field(default_factory=dict)


StepCallback = Callable[[int, str, TokenLogprobs], bool]
"""`(token, source, logprobs) -> stop now?`, called once per token as it is final."""


@dataclass(frozen=True)
class Stopping:
    """When a sequence ends besides `max_tokens`: EOS (unless `ignore_eos`); and `min_tokens`, before
    which EOS and `stop_token_ids` are suppressed (the engine's rule; the caller's callback stops on
    stop ids and strings)."""

    ignore_eos: bool = False
    min_tokens: int = 0
    stop_token_ids: tuple[int, ...] = ()


class EdgeRunner:
    """Generates with layers `[0, K)` + exit head, deferring unsure tokens to a cloud: greedily, or
    sampled with position-seeded randomness so that both sides would draw the same token."""

    def __init__(self, model: CausalLM, hf_config: dict[str, Any], config: EdgeConfig,
                 connect: Callable[[], Link] | None, dtype: torch.dtype = torch.float32,
                 eos_token_ids: tuple[int, ...] = (), exit_head: ExitHead | None = None,
                 max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES) -> None:
        num_layers = model.kv_cache_spec().end
        if not 1 <= config.split_layer < num_layers:
            raise ValueError(f"split_layer={config.split_layer}: the edge needs layers [0, K) with "
                             f"1 <= K < {num_layers} (the model's layers)")
        self.model = model
        self.config = config
        self.dtype = dtype
        self.eos_token_ids = eos_token_ids
        self.exit_head: ExitHead = exit_head if exit_head is not None else model.head
        self.model_key = model_key(hf_config, config.split_layer)
        self.link = EdgeLink(connect, config, max_frame_bytes)
        self.stats = EdgeStats()
        self.picker = TokenPicker()

    @torch.inference_mode()
    def generate(self, prompt_ids: list[int], max_tokens: int, ignore_eos: bool = False,
                 on_token: Callable[[int, str], None] | None = None, sampling: SplitSampling = GREEDY,
                 stopping: Stopping | None = None, on_step: StepCallback | None = None) -> EdgeResult:
        """Continuation of `prompt_ids` (greedy unless `sampling` says otherwise; its `num_prompt` is
        set here); `on_token(id, source)` sees each token as it is final, `on_step` too and may stop."""
        if not prompt_ids or len(prompt_ids) + max_tokens > self.config.max_len:
            raise ValueError(f"prompt of {len(prompt_ids)} tokens + max_tokens={max_tokens} must be non-empty "
                             f"and fit max_len={self.config.max_len}")
        stopping = stopping or Stopping(ignore_eos)
        sampling = replace(sampling, num_prompt=len(prompt_ids))
        stage = SequenceStage(self.model, 0, self.config.split_layer, self.config.max_len, self.dtype)
        session = CloudSession(self.link, self.config, self.model_key, sampling)
        sent0, recv0 = self.link.bytes_sent, self.link.bytes_received
        result = EdgeResult([], [], [], "length")
        context, ids = list(prompt_ids), list(prompt_ids)
        try:
            while len(result.token_ids) < max_tokens:
                start = time.perf_counter()
                hidden = stage.forward(token_ids=ids)
                session.add(hidden, ids)
                position = stage.num_computed  # the sequence position of the token decided now
                suppress = self._suppressed(stopping, len(result.token_ids))
                logits = self.exit_head(hidden[-1:])[0]
                prob = self.picker.exit_probability(logits, sampling, context, position, suppress)
                self.stats.edge_compute_s += time.perf_counter() - start
                source, reply = self._decide(session, position - 1, prob, suppress)
                if reply is None:  # decided here: the edge's own draw with the position's randomness
                    token, entry = self.picker.pick(logits, sampling, context, position, suppress)
                else:
                    token, entry = reply[0], {t: Logprob(lp, rank) for t, lp, rank in reply[3]}
                self._count(source)
                result.token_ids.append(token)
                result.sources.append(source)
                result.exit_probs.append(prob)
                result.logprobs.append(entry)
                context.append(token)
                if on_token is not None:
                    on_token(token, source)
                stop = on_step is not None and on_step(token, source, entry)
                eos = token in self.eos_token_ids and not stopping.ignore_eos
                if eos or stop:
                    result.finish_reason = "stop"
                    break
                ids = [token]
        finally:
            session.close()
        result.usage = {"edge_tokens": result.sources.count("edge"), "cloud_tokens": result.sources.count("cloud"),
                        "standalone_tokens": result.sources.count("standalone"),
                        "link_bytes_sent": self.link.bytes_sent - sent0,
                        "link_bytes_received": self.link.bytes_received - recv0}
        return result

    def _suppressed(self, stopping: Stopping, num_output: int) -> tuple[int, ...]:
        if num_output >= stopping.min_tokens:
            return ()
        return stopping.stop_token_ids + (() if stopping.ignore_eos else self.eos_token_ids)

    def _decide(self, session: CloudSession, pos: int, prob: float,
                suppress: tuple[int, ...]) -> tuple[str, Reply | None]:
        """Where the token after `pos` comes from, and the cloud's answer when it gave one."""
        if not self.config.always_defer and prob >= self.config.exit_threshold:
            return "edge", None
        start = time.perf_counter()
        answer = session.infer(pos, suppress)
        self.stats.cloud_wait_s += time.perf_counter() - start
        return ("standalone", None) if answer is None else ("cloud", answer)

    def _count(self, source: str) -> None:
        self.stats.num_tokens += 1
        if source == "edge":
            self.stats.num_exit += 1
        elif source == "cloud":
            self.stats.num_cloud += 1
        else:
            self.stats.num_standalone += 1

    def close(self) -> None:
        self.link.drop()
