"""Calibration text for `moefy`, and recording a dense model's FFN activations on it.

The default calibration set is fixed and present wherever Python runs: the docstrings of a fixed list
of standard-library modules (English prose about programming, as the chat/task prompts are).
`HELD_OUT_MODULES` is a disjoint list for quality checks. The text's sha256 goes into `moefy.json`, so a
different Python version (slightly different docstrings) is visible. `--calibration FILE...` replaces it.

`record_ffn` runs the dense model over the token windows with hooks on every FFN and keeps, per layer,
the FFN input `x` (`[num_tokens, hidden_size]`) and the intermediate activation
`h = act(gate x) * up x` (`[num_tokens, intermediate_size]`; act: silu, or tanh-gelu for gemma3), the
quantities MoEfication clusters and the routers are fitted on.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from mixserve.layers.attention import AttentionMetadata
from mixserve.models.base import as_causal_lm
from mixserve.runner.model_runner import allocate_kv_caches

CALIBRATION_MODULES: tuple[str, ...] = (
    "argparse", "asyncio.events", "collections", "concurrent.futures._base", "contextlib", "dataclasses",
    "datetime", "decimal", "email.message", "enum", "functools", "http.client", "http.server", "inspect",
    "json", "logging", "multiprocessing.pool", "os", "pathlib", "pickle", "random", "re", "shutil",
    "socket", "sqlite3", "string", "subprocess", "tarfile", "threading", "typing", "unittest.case",
    "urllib.parse", "zipfile",
)
"""Standard-library modules whose docstrings (module, classes, functions) form the calibration text."""

HELD_OUT_MODULES: tuple[str, ...] = (
    "abc", "ast", "base64", "bisect", "calendar", "csv", "difflib", "doctest", "fractions", "gettext",
    "glob", "gzip", "heapq", "hmac", "imaplib", "ipaddress", "locale", "mailbox", "optparse", "pprint",
    "queue", "sched", "selectors", "shlex", "statistics", "tempfile", "textwrap", "timeit", "trace",
    "turtle", "uuid", "warnings", "weakref",
)
"""A disjoint set of modules for held-out perplexity and greedy agreement."""


def module_docstrings(names: Sequence[str]) -> list[str]:
    """The docstrings of each module and of its public classes and functions, in a fixed order."""
    texts: list[str] = []
    for name in names:
        try:
            module = importlib.import_module(name)
        except ImportError:  # e.g. turtle without tkinter: skipped, visible in the sha256
            continue
        docs = [inspect.getdoc(module)]
        for attr, obj in sorted(vars(module).items()):
            if not attr.startswith("_") and (inspect.isclass(obj) or inspect.isfunction(obj)) \
                    and getattr(obj, "__module__", None) == module.__name__:
                docs.append(inspect.getdoc(obj))
        texts.append("\n\n".join(d for d in docs if d))
    return [t for t in texts if t]


@dataclass(frozen=True)
class CalibrationText:
    """The text `moefy` records activations on, and where it came from."""

    texts: tuple[str, ...]
    """Documents, in order."""
    source: str
    """`stdlib-docstrings` or the file paths given."""

    @property
    def sha256(self) -> str:
        return hashlib.sha256("\x00".join(self.texts).encode()).hexdigest()


def calibration_text(files: Sequence[str | Path] = ()) -> CalibrationText:
    """The given text files, or the default standard-library docstring set."""
    if not files:
        return CalibrationText(tuple(module_docstrings(CALIBRATION_MODULES)), "stdlib-docstrings")
    texts = []
    for f in files:
        path = Path(f)
        if not path.is_file():
            raise ValueError(f"calibration file {path}: no such file")
        texts.append(path.read_text(encoding="utf-8", errors="replace"))
    return CalibrationText(tuple(texts), ",".join(str(f) for f in files))


def token_windows(token_ids: Sequence[Sequence[int]], window: int, max_tokens: int) -> list[list[int]]:
    """Documents cut into windows of at most `window` tokens, `max_tokens` in all."""
    out: list[list[int]] = []
    total = 0
    for ids in token_ids:
        for start in range(0, len(ids), window):
            chunk = list(ids[start:start + window])[:max_tokens - total]
            if len(chunk) >= 2:
                out.append(chunk)
                total += len(chunk)
            if total >= max_tokens:
                return out
    return out


def forward_logits(model: nn.Module, ids: Sequence[int]) -> torch.Tensor:
    """`[len(ids), vocab_size]` logits of one fresh sequence through a mixserve `CausalLM`."""
    lm = as_causal_lm(model)
    n = len(ids)
    kv = allocate_kv_caches(lm.kv_cache_spec(), n, 1, next(model.parameters()).dtype)
    meta = AttentionMetadata(query_lens=[n], seq_lens=[n], slot_mapping=torch.arange(n), kv_slots=None,
                             q_index=None)
    with torch.no_grad():
        positions = torch.arange(n)
        hidden = lm.forward_layers(lm.embed(torch.tensor(list(ids))), positions, meta, kv, 0, len(kv))
        return lm.head(hidden)


@dataclass
class FFNRecord:
    """One layer's recorded FFN traffic over all calibration tokens."""

    x: torch.Tensor
    """`[num_tokens, hidden_size]` float32 FFN inputs (after the pre-FFN norm)."""
    h: torch.Tensor
    """`[num_tokens, intermediate_size]` float32 intermediate activations act(gate x) * up x (the input of
    the down projection)."""


def record_ffn(model: nn.Module, windows: Sequence[Sequence[int]]) -> list[FFNRecord]:
    """Run a dense mixserve model (blocks with `mlp.gate_up_proj` and `mlp.down_proj`: llama, qwen2, qwen3,
    gemma3) over `windows` and record every layer's FFN traffic (into buffers allocated once: memory is
    the records themselves, no concatenation copies)."""
    layers = getattr(getattr(model, "model", None), "layers", None)
    if layers is None:
        raise ValueError(f"{type(model).__name__}: no model.layers to record")
    num_tokens = sum(len(w) for w in windows)
    records = [FFNRecord(torch.empty(num_tokens, block.mlp.gate_up_proj.in_features),
                         torch.empty(num_tokens, block.mlp.down_proj.in_features)) for block in layers]
    offset = 0

    def keep(buffer: torch.Tensor, value: torch.Tensor) -> None:
        buffer[offset:offset + value.shape[0]] = value.detach()

    handles = []
    for rec, block in zip(records, layers):
        handles.append(block.mlp.register_forward_pre_hook(lambda _m, args, r=rec: keep(r.x, args[0])))
        handles.append(block.mlp.down_proj.register_forward_pre_hook(lambda _m, args, r=rec: keep(r.h, args[0])))
    try:
        for ids in windows:
            forward_logits(model, ids)
            offset += len(ids)
    finally:
        for handle in handles:
            handle.remove()
    return records
