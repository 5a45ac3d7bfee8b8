"""OpenAI response shapes: accumulated choices, logprobs in the completions and chat formats, usage."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from mixserve.outputs import CompletionOutput, TokenLogprobs

TokenText = Callable[[int], str]


@dataclass
class Choice:
    """One choice of a response, accumulated from deltas."""

    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprobs] = field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    error: str | None = None

    def add(self, part: CompletionOutput) -> None:
        self.text += part.text
        self.token_ids.extend(part.token_ids)
        self.logprobs.extend(part.logprobs or [])
        if part.finish_reason is not None:
            # an aborted sample reports "abort"; a failed one carries its error
            self.finish_reason = part.finish_reason.value
            self.stop_reason = part.stop_reason
            self.error = part.error


@dataclass
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens,
                "prompt_tokens_details": {"cached_tokens": self.cached_tokens}, **self.extra}


MIN_LOGPROB = -9999.0
"""What a logprob of -inf (or NaN) is sent as: JSON has no infinities (vLLM sends the same value)."""


def _finite(logprob: float) -> float:
    return logprob if logprob >= MIN_LOGPROB else MIN_LOGPROB


def _chosen(entry: TokenLogprobs, token_id: int) -> float:
    lp = entry.get(token_id)
    return _finite(lp.logprob) if lp is not None else MIN_LOGPROB


def _top(entry: TokenLogprobs, k: int) -> list[tuple[int, float]]:
    ranked = sorted(entry.items(), key=lambda kv: kv[1].rank)
    return [(tid, _finite(lp.logprob)) for tid, lp in ranked if lp.rank <= k]


def completion_logprobs(token_ids: list[int], entries: list[TokenLogprobs | None], k: int, text: TokenText,
                        start_offset: int) -> dict[str, Any]:
    """Legacy completions format: parallel lists of tokens, their logprobs, top-k dicts and text offsets."""
    tokens: list[str] = []
    token_lps: list[float | None] = []
    tops: list[dict[str, float] | None] = []
    offsets: list[int] = []
    offset = start_offset
    for tid, entry in zip(token_ids, entries):
        piece = text(tid)
        tokens.append(piece)
        offsets.append(offset)
        offset += len(piece)
        if entry is None:
            token_lps.append(None)
            tops.append(None)
            continue
        token_lps.append(_chosen(entry, tid))
        top = {text(t): lp for t, lp in _top(entry, k)}
        top.setdefault(piece, _chosen(entry, tid))
        tops.append(top)
    return {"tokens": tokens, "token_logprobs": token_lps, "top_logprobs": tops, "text_offset": offsets}


def chat_logprobs(token_ids: list[int], entries: list[TokenLogprobs], k: int, text: TokenText) -> dict[str, Any]:
    """Chat format: one entry per token with its bytes and the top-k alternatives."""
    content = []
    for tid, entry in zip(token_ids, entries):
        piece = text(tid)
        content.append({
            "token": piece, "logprob": _chosen(entry, tid), "bytes": list(piece.encode("utf-8")),
            "top_logprobs": [{"token": text(t), "logprob": lp, "bytes": list(text(t).encode("utf-8"))}
                             for t, lp in _top(entry, k)]})
    return {"content": content}


def finish_fields(choice: Choice) -> dict[str, Any]:
    out: dict[str, Any] = {"finish_reason": choice.finish_reason, "stop_reason": choice.stop_reason}
    if choice.error is not None:
        out["error"] = choice.error
    return out
