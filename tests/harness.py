"""Drive a model module directly over a toy paged cache (no engine): for model parity tests.

Sequences get contiguous slots `[i * stride, i * stride + len)`, which is a valid paged layout with
one long block per sequence. `forward_packed` packs several sequences' new tokens into one batch.
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import httpx
import torch

from mixserve.layers.attention import AttentionMetadata, KVCache
from mixserve.models.base import as_causal_lm
from mixserve.runner.model_runner import allocate_kv_caches


def make_kv_caches(model: torch.nn.Module, num_slots: int, dtype: torch.dtype) -> list[KVCache]:
    return allocate_kv_caches(as_causal_lm(model).kv_cache_spec(), num_slots, 1, dtype)


def forward_packed(model: torch.nn.Module, kv: list[KVCache], chunks: list[list[int]],
                   starts: list[int], seq_ids: list[int], stride: int = 4096) -> torch.Tensor:
    """Run new tokens `chunks[i]` of sequence `seq_ids[i]` whose first new token is at position
    `starts[i]`; returns `[num_tokens, vocab]` logits for every new token."""
    query_lens = [len(c) for c in chunks]
    seq_lens = [s + n for s, n in zip(starts, query_lens)]
    ids = torch.tensor([t for c in chunks for t in c])
    positions = torch.tensor([p for s, n in zip(starts, query_lens) for p in range(s, s + n)])
    slot_mapping = torch.tensor([sid * stride + p for sid, s, n in zip(seq_ids, starts, query_lens)
                                 for p in range(s, s + n)])
    max_q, max_s = max(query_lens), max(seq_lens)
    kv_slots = torch.zeros(len(chunks), max_s, dtype=torch.long)
    for i, (sid, sl) in enumerate(zip(seq_ids, seq_lens)):
        kv_slots[i, :sl] = torch.arange(sid * stride, sid * stride + sl)
    q_index = None
    if any(q != max_q for q in query_lens):
        q_index = torch.tensor([i * max_q + t for i, n in enumerate(query_lens) for t in range(n)])
    meta = AttentionMetadata(query_lens=query_lens, seq_lens=seq_lens, slot_mapping=slot_mapping,
                             kv_slots=kv_slots, q_index=q_index)
    with torch.no_grad():
        return model(ids, positions, meta, kv)  # the whole model: embed, every block, head


def prefill_logits(model: torch.nn.Module, ids: list[int], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """`[len(ids), vocab]` logits of one fresh sequence (self-contained prefill path)."""
    kv = make_kv_caches(model, 4096, dtype)
    return forward_packed(model, kv, [ids], [0], [0])


def greedy(model: torch.nn.Module, ids: list[int], max_new: int,
           dtype: torch.dtype = torch.float32) -> list[int]:
    """Greedy continuation: prefill, then one decode step per token through the gather path."""
    kv = make_kv_caches(model, 4096, dtype)
    logits = forward_packed(model, kv, [ids], [0], [0])
    out = [int(logits[-1].argmax())]
    while len(out) < max_new:
        logits = forward_packed(model, kv, [[out[-1]]], [len(ids) + len(out) - 1], [0])
        out.append(int(logits[-1].argmax()))
    return out


def wait_healthy(proc: subprocess.Popen[bytes], url: str, log: Path, timeout_s: float, interval_s: float) -> bool:
    """Poll `url`/health until 200 (True), a failed model load or `timeout_s` (False); raises if `proc` exits."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            health = httpx.get(f"{url}/health", timeout=2)
            if health.status_code == 200:
                return True
            if health.json()["error"]["code"] == "model_load_failed":
                return False
        except httpx.HTTPError:
            pass
        time.sleep(interval_s)
    return False
