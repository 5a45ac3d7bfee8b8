"""Request bodies under `RequestLimits`: read with a size cap and a deadline, parse, check their structure.

`read_body` runs on the event loop (it only awaits bytes); `decode_json` is CPU work and runs in a worker
thread (`offload`), so a huge or hostile body never stalls `/health` or other requests.
"""

from __future__ import annotations

import asyncio
import functools
import json
import math
from collections.abc import Callable
from typing import Any, TypeVar
from urllib.parse import quote

from fastapi import Request
from starlette.requests import ClientDisconnect

from mixserve.server.errors import ApiError
from mixserve.server.limits import INT_MAX, INT_MIN, RequestLimits

T = TypeVar("T")
MAX_HEADER_VALUE_CHARS = 1024


async def offload(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Run CPU work (parsing, tokenization, big responses) off the event loop."""
    return await asyncio.get_running_loop().run_in_executor(None, functools.partial(fn, *args, **kwargs))


async def read_body(request: Request, limits: RequestLimits) -> bytes:
    """The body, at most `max_body_bytes` (413), within `body_timeout_s` (408); a vanished client is 499."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limits.max_body_bytes:
        raise _too_large(limits, int(declared))
    chunks: list[bytes] = []
    size = 0
    try:
        async with asyncio.timeout(limits.body_timeout_s):
            async for chunk in request.stream():
                size += len(chunk)
                if size > limits.max_body_bytes:
                    raise _too_large(limits, size)
                chunks.append(chunk)
    except TimeoutError as exc:
        raise ApiError(408, f"the request body did not arrive within {limits.body_timeout_s:g}s",
                       code="request_timeout") from exc
    except ClientDisconnect as exc:
        raise ApiError(499, "client disconnected before the request body was complete",
                       code="client_disconnected") from exc
    return b"".join(chunks)


def _too_large(limits: RequestLimits, size: int) -> ApiError:
    return ApiError(413, f"request body too large: {size} bytes or more; this server accepts at most "
                    f"{limits.max_body_bytes} (--max-body-bytes)", code="request_too_large")


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON (numbers must be finite)")


def decode_json(raw: bytes, limits: RequestLimits) -> dict[str, Any]:
    """Bytes -> a JSON object whose every value passes `check_structure`; errors are 400s."""
    try:
        data = json.loads(raw, parse_constant=_no_constants)
    except RecursionError as exc:
        raise ApiError(400, f"request body nests deeper than {limits.max_json_depth} levels (--max-json-depth)",
                       param="body") from exc
    except ValueError as exc:  # JSONDecodeError, bad UTF-8/16/32, NaN/Infinity, integers of > 4300 digits
        raise ApiError(400, f"request body is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise ApiError(400, f"request body must be a JSON object, got {type(data).__name__}")
    check_structure(data, limits)
    return data


def check_structure(data: Any, limits: RequestLimits) -> None:
    """Depth, string length, valid Unicode (no lone surrogates), finite numbers, integers in range.

    Iterative (no recursion, whatever the depth); lists of plain ints take a fast path.
    """
    stack: list[tuple[Any, tuple[str | int, ...]]] = [(data, ())]
    while stack:
        value, path = stack.pop()
        if isinstance(value, dict):
            _check_depth(path, limits)
            for key, item in value.items():
                _check_str(key, (*path, key), limits)
                stack.append((item, (*path, key)))
        elif isinstance(value, list):
            _check_depth(path, limits)
            if value and all(type(x) is int for x in value):
                if min(value) < INT_MIN or max(value) > INT_MAX:
                    bad = next(x for x in value if not INT_MIN <= x <= INT_MAX)
                    raise _field_error(path, f"integer {_short(bad)} is out of range [-2**63, 2**64 - 1]")
                continue
            stack.extend((item, (*path, i)) for i, item in enumerate(value))
        elif isinstance(value, str):
            _check_str(value, path, limits)
        elif isinstance(value, bool) or value is None:
            continue
        elif isinstance(value, int):
            if not INT_MIN <= value <= INT_MAX:
                raise _field_error(path, f"integer {_short(value)} is out of range [-2**63, 2**64 - 1]")
        elif isinstance(value, float) and not math.isfinite(value):
            raise _field_error(path, f"number {value} is not finite")


def _check_depth(path: tuple[str | int, ...], limits: RequestLimits) -> None:
    if len(path) >= limits.max_json_depth:
        raise _field_error(path[:1], f"nests deeper than {limits.max_json_depth} levels (--max-json-depth)")


def _check_str(text: str, path: tuple[str | int, ...], limits: RequestLimits) -> None:
    if len(text) > limits.max_string_chars:
        raise _field_error(path, f"a string of {len(text)} characters is longer than the server's limit of "
                           f"{limits.max_string_chars} (--max-string-chars)")
    if not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise _field_error(path, f"invalid Unicode: lone surrogate {text[exc.start]!r} at index {exc.start}"
                               ) from exc


def field_name(path: tuple[str | int, ...]) -> str:
    """`messages.0.content` style; long or odd names are shortened and escaped (they come from the client)."""
    name = ".".join(str(p) for p in path) or "body"
    name = name.encode("utf-8", "backslashreplace").decode("utf-8")
    return name if len(name) <= 200 else name[:200] + "..."


def _field_error(path: tuple[str | int, ...], why: str) -> ApiError:
    name = field_name(path)
    return ApiError(400, f"invalid field {name}: {why}", param=name)


def _short(value: int) -> str:
    text = str(value) if value.bit_length() < 256 else f"~2**{value.bit_length() - 1}"
    return text


def header_value(names: list[str]) -> str:
    """Client-chosen field names as a safe header value: percent-encoded (RFC 3986 unreserved kept), capped."""
    value = ",".join(quote(name, safe="", errors="backslashreplace") for name in names)
    return value if len(value) <= MAX_HEADER_VALUE_CHARS else value[:MAX_HEADER_VALUE_CHARS] + "..."
