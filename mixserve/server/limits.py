"""`RequestLimits`: what one HTTP request may be, checked before any expensive work (parsing, tokenizing).

Every limit is a `mixserve serve` flag (see README, "Limits"). A request over a limit gets a 4xx in the
OpenAI error shape naming the field; the connection-level ones (slow headers, stalled writes) close it.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

from mixserve.config import ConfigError

INT_MIN = -(2**63)
INT_MAX = 2**64 - 1
"""Every JSON integer anywhere in a body must lie in [-2**63, 2**64 - 1] (int64 or uint64)."""


@dataclass(frozen=True)
class RequestLimits:
    """Per-request and per-connection limits of the HTTP server."""

    max_body_bytes: int = 8 * 1024 * 1024
    """Largest request body; a larger one is answered 413 before it is read (Content-Length) or as it
    arrives (chunked)."""
    max_json_depth: int = 64
    """Deepest nesting of arrays/objects in a body (a chat message's content part is depth 4)."""
    max_string_chars: int = 1_000_000
    """Longest string anywhere in a body (prompt, message content, field name), in characters; checked
    before tokenization. Prompts are also bounded in tokens by the model's context length."""
    body_timeout_s: float = 30.0
    """Time the client has to send the whole body once its headers arrived (408 after)."""
    header_timeout_s: float = 20.0
    """Time a connection has to send a request's complete headers, from connect or from the end of the
    previous response; a connection that trickles or stalls its headers is closed."""
    keep_alive_timeout_s: float = 5.0
    """An idle keep-alive connection is closed after this long (uvicorn's `timeout_keep_alive`)."""
    write_timeout_s: float = 60.0
    """A client that stops reading a response for this long is disconnected (its request is aborted)."""
    max_header_bytes: int = 16 * 1024
    """Largest request line + headers (h11's `max_incomplete_event_size`); larger gets 400 and a close."""
    max_strategy_budget: int = 256
    """Largest `budget` of a strategy request (samples, beams or particles): its samples are forks that
    bypass `max_num_seqs`, so this bounds the work one request can ask for; larger is 400."""

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
                raise ConfigError(f"invalid server config {f.name}={value!r}: must be a number > 0")
        for name in ("max_body_bytes", "max_json_depth", "max_string_chars", "max_header_bytes", "max_strategy_budget"):
            if not isinstance(getattr(self, name), int):
                raise ConfigError(f"invalid server config {name}={getattr(self, name)!r}: must be an integer")


LIMIT_HELP = {
    "max_body_bytes": "largest request body in bytes; larger is 413",
    "max_json_depth": "deepest JSON nesting of a body",
    "max_string_chars": "longest string in a body (prompt, content, field name), checked before tokenizing",
    "body_timeout_s": "seconds a client has to send its body after the headers (408 after)",
    "header_timeout_s": "seconds a connection has to send a request's complete headers (closed after)",
    "keep_alive_timeout_s": "seconds an idle keep-alive connection stays open",
    "write_timeout_s": "seconds a client may stop reading a response before it is disconnected",
    "max_header_bytes": "largest request line + headers in bytes (400 after)",
    "max_strategy_budget": "largest `budget` of a strategy request (its samples bypass --max-num-seqs); larger is 400",
}
"""`mixserve serve` flags: `--max-body-bytes` ... (a `_s` suffix is dropped: `--body-timeout`)."""


def flag_name(field_name: str) -> str:
    return "--" + field_name.removesuffix("_s").replace("_", "-")
