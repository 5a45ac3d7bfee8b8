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
from dataclasses import dataclass, field
from typing import Any

import torch

from mixserve.edge.config import DEFAULT_MAX_FRAME_BYTES, EdgeConfig
from mixserve.edge.frames import model_key
from mixserve.edge.link import Link
from mixserve.edge.session import CloudSession, EdgeLink
from mixserve.edge.stage import SequenceStage
from mixserve.models.base import CausalLM

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
    """Per token: the exit head's top probability."""
    finish_reason: str
    usage: dict[str, Any] = field(default_factory=dict)


class EdgeRunner:
    """Generates greedily with layers `[0, K)` + exit head, deferring unsure tokens to a cloud."""

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

    @torch.inference_mode()
    def generate(self, prompt_ids: list[int], max_tokens: int, ignore_eos: bool = False,
                 on_token: Callable[[int, str], None] | None = None) -> EdgeResult:
        """Greedy continuation of `prompt_ids`; `on_token(id, source)` sees each token as it is final."""
        if not prompt_ids or len(prompt_ids) + max_tokens > self.config.max_len:
            raise ValueError(f"prompt of {len(prompt_ids)} tokens + max_tokens={max_tokens} must be non-empty "
                             f"and fit max_len={self.config.max_len}")
        stage = SequenceStage(self.model, 0, self.config.split_layer, self.config.max_len, self.dtype)
        session = CloudSession(self.link, self.config, self.model_key)
        sent0, recv0 = self.link.bytes_sent, self.link.bytes_received
        result = EdgeResult([], [], [], "length")
        ids = list(prompt_ids)
        try:
            while len(result.token_ids) < max_tokens:
                start = time.perf_counter()
                hidden = stage.forward(token_ids=ids)
                session.add(hidden)
                logprobs = torch.log_softmax(self.exit_head(hidden[-1:])[0].float(), dim=-1)
                top, token_t = logprobs.max(dim=-1)
                token, prob = int(token_t), float(top.exp())
                self.stats.edge_compute_s += time.perf_counter() - start
                source, cloud_token = self._decide(session, stage.num_computed - 1, prob)
                token = token if cloud_token is None else cloud_token
                self._count(source)
                result.token_ids.append(token)
                result.sources.append(source)
                result.exit_probs.append(prob)
                if on_token is not None:
                    on_token(token, source)
                if token in self.eos_token_ids and not ignore_eos:
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

    def _decide(self, session: CloudSession, pos: int, prob: float) -> tuple[str, int | None]:
        """Where the token after `pos` comes from, and the cloud's token when it answered."""
        if not self.config.always_defer and prob >= self.config.exit_threshold:
            return "edge", None
        start = time.perf_counter()
        answer = session.infer(pos)
        self.stats.cloud_wait_s += time.perf_counter() - start
        return ("standalone", None) if answer is None else ("cloud", answer[0])

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
