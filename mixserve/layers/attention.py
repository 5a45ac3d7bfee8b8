"""Paged attention over a flat slot cache, with a torch SDPA reference backend.

The KV cache of one layer is a pair of tensors `[num_slots, num_kv_heads, head_dim]` where
`num_slots = num_blocks * block_size`; slot `b * block_size + i` holds token `i` of block `b`.
A forward pass writes the new tokens' K/V at `slot_mapping`, then gathers each sequence's context
through `kv_slots` and runs masked SDPA. Sequences are packed: the tokens of sequence `i` are rows
`query_start[i]:query_start[i + 1]` of every `[num_tokens, ...]` tensor.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

KVCache = tuple[torch.Tensor, torch.Tensor]
"""(k_cache, v_cache), each `[num_slots, num_kv_heads, head_dim]`."""


class ViewAttention(Protocol):
    """Attention over something other than each sequence's own block table (e.g. hogwild views:
    ordered segments of shared blocks, mixserve/hogwild/). Called after the step's K/V are written."""

    def attend(self, q: torch.Tensor, kv_cache: KVCache, layer: Attention) -> torch.Tensor:
        """`[num_tokens, num_heads, head_dim]` queries -> `[num_tokens, num_heads * head_dim]`."""
        ...


@dataclass
class AttentionMetadata:
    """Layout of one packed batch; built once per step by the runner, shared by every layer."""

    query_lens: list[int]
    """New tokens per sequence this step."""
    seq_lens: list[int]
    """Context length per sequence after this step (cached + new)."""
    slot_mapping: torch.Tensor
    """`[num_tokens]` int64: cache slot receiving each new token's K/V."""
    kv_slots: torch.Tensor | None
    """`[num_seqs, max_seq_len]` int64: slots of each sequence's context (padding -> 0); None when
    every sequence is a fresh prefill that needs no gather (see `self_contained`)."""
    q_index: torch.Tensor | None
    """`[num_tokens]` int64: row of each token in the padded `[num_seqs * max_query_len]` layout;
    None when all query_lens are equal (no padding needed)."""
    groups: list[AttentionMetadata] | None = None
    """Optional split of the batch into consecutive groups of sequences, each attended separately
    (e.g. all decodes in one group, each long prefill alone) so short queries are not padded to the
    longest one. Each group's `slot_mapping` is unused (the cache write is done once for the batch)."""
    view: ViewAttention | None = None
    """When set, every layer attends through it instead of `kv_slots`/`groups` (hogwild views)."""
    _masks: dict[int | None, torch.Tensor | None] = field(default_factory=dict, repr=False)
    _biases: dict[tuple[str, int | None], torch.Tensor | None] = field(default_factory=dict, repr=False)

    def decode_bias(self, sliding_window: int | None) -> torch.Tensor | None:
        """`mask(sliding_window)` as an additive float32 bias (0 or -inf), `[num_seqs, 1, 1,
        max_seq_len]` for one-token queries; None when every key is visible. Cached per window."""
        key = ("bias", sliding_window)
        if key not in self._biases:
            mask = self.mask(sliding_window)
            self._biases[key] = None if mask is None else torch.zeros(mask.shape).masked_fill_(
                ~mask, float("-inf"))
        return self._biases[key]

    @property
    def num_seqs(self) -> int:
        return len(self.query_lens)

    @property
    def max_query_len(self) -> int:
        return max(self.query_lens)

    @property
    def max_seq_len(self) -> int:
        return max(self.seq_lens)

    @property
    def self_contained(self) -> bool:
        """One sequence with nothing cached: attention needs only this step's K/V."""
        return self.num_seqs == 1 and self.seq_lens[0] == self.query_lens[0]

    def mask(self, sliding_window: int | None) -> torch.Tensor | None:
        """Boolean `[num_seqs, 1, max_query_len, max_seq_len]` (True = attend), cached per window.

        Query row t of sequence i sits at absolute position `p = seq_len - query_len + t` and sees
        keys j with `j <= p`, `j < seq_len` and (sliding) `p - j < sliding_window`. Padding rows see
        key 0 only, so softmax never meets an all-masked row.
        """
        if sliding_window is not None and sliding_window >= self.max_seq_len:
            sliding_window = None
        if sliding_window in self._masks:
            return self._masks[sliding_window]
        if self.self_contained and sliding_window is None:
            self._masks[sliding_window] = None  # plain causal, SDPA's is_causal does it
            return None
        if sliding_window is None and self.max_query_len == 1 and min(self.seq_lens) == self.max_seq_len:
            self._masks[sliding_window] = None  # decodes of equal length see every gathered key
            return None
        q_lens = torch.tensor(self.query_lens)
        s_lens = torch.tensor(self.seq_lens)
        t = torch.arange(self.max_query_len)
        j = torch.arange(self.max_seq_len)
        pos = (s_lens - q_lens)[:, None] + t[None, :]  # [num_seqs, max_query_len]
        allowed = (j[None, None, :] <= pos[:, :, None]) & (j[None, None, :] < s_lens[:, None, None])
        if sliding_window is not None:
            allowed &= (pos[:, :, None] - j[None, None, :]) < sliding_window
        padding = t[None, :] >= q_lens[:, None]
        allowed[padding] = j == 0
        mask = allowed[:, None, :, :]
        self._masks[sliding_window] = mask
        return mask


class Attention(nn.Module):
    """Multi-head attention with grouped KV heads over the paged cache (no parameters).

    q: `[num_tokens, num_heads, head_dim]`; k, v: `[num_tokens, num_kv_heads, head_dim]`,
    already rotated. Returns `[num_tokens, num_heads * head_dim]`.
    """

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float,
                 sliding_window: int | None = None) -> None:
        super().__init__()
        if num_heads % num_kv_heads:
            raise ValueError(f"num_heads={num_heads} is not a multiple of num_kv_heads={num_kv_heads}")
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.scale = scale
        self.sliding_window = sliding_window

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: KVCache,
                meta: AttentionMetadata) -> torch.Tensor:
        k_cache, v_cache = kv_cache
        if k.dtype != k_cache.dtype:
            k, v = k.to(k_cache.dtype), v.to(v_cache.dtype)
        k_cache.index_copy_(0, meta.slot_mapping, k)
        v_cache.index_copy_(0, meta.slot_mapping, v)
        if meta.view is not None:
            return meta.view.attend(q, kv_cache, self)
        if meta.groups is None:
            return self._attend(q, k, v, kv_cache, meta)
        outs, start = [], 0
        for group in meta.groups:
            end = start + sum(group.query_lens)
            outs.append(self._attend(q[start:end], k[start:end], v[start:end], kv_cache, group))
            start = end
        return torch.cat(outs) if len(outs) > 1 else outs[0]

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: KVCache,
                meta: AttentionMetadata) -> torch.Tensor:
        k_cache, v_cache = kv_cache
        num_tokens = q.shape[0]
        mask = meta.mask(self.sliding_window)
        gqa = self.num_heads != self.num_kv_heads
        if meta.self_contained:
            # [1, heads, num_tokens, head_dim] straight from this step's K/V.
            out = F.scaled_dot_product_attention(
                q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],
                attn_mask=mask, is_causal=mask is None, scale=self.scale, enable_gqa=gqa)
            return out[0].transpose(0, 1).reshape(num_tokens, -1)
        assert meta.kv_slots is not None
        num_seqs, max_q = meta.num_seqs, meta.max_query_len
        if max_q == 1:
            return self._decode(q, kv_cache, meta)
        # [num_seqs, num_kv_heads, max_seq_len, head_dim] gathered context.
        keys = _gather(k_cache, meta.kv_slots, q.dtype).transpose(1, 2)
        values = _gather(v_cache, meta.kv_slots, q.dtype).transpose(1, 2)
        if meta.q_index is None:
            q_pad = q.view(num_seqs, max_q, self.num_heads, self.head_dim)
        else:
            q_pad = q.new_zeros(num_seqs * max_q, self.num_heads, self.head_dim)
            q_pad[meta.q_index] = q
            q_pad = q_pad.view(num_seqs, max_q, self.num_heads, self.head_dim)
        out = F.scaled_dot_product_attention(q_pad.transpose(1, 2), keys, values, attn_mask=mask,
                                             is_causal=False, scale=self.scale, enable_gqa=gqa)
        out = out.transpose(1, 2).reshape(num_seqs * max_q, self.num_heads * self.head_dim)
        if meta.q_index is not None:
            out = out[meta.q_index]
        return out

    def _decode(self, q: torch.Tensor, kv_cache: KVCache, meta: AttentionMetadata) -> torch.Tensor:
        """One query token per sequence: two batched matmuls over the gathered context, each KV
        head's query group in one matrix (no SDPA set-up, no GQA expansion of K/V)."""
        assert meta.kv_slots is not None
        num_seqs, group = meta.num_seqs, self.num_heads // self.num_kv_heads
        keys = _gather(kv_cache[0], meta.kv_slots, q.dtype)  # [num_seqs, max_seq_len, kv_heads, head_dim]
        values = _gather(kv_cache[1], meta.kv_slots, q.dtype)
        q_groups = (q * self.scale).view(num_seqs, self.num_kv_heads, group, self.head_dim)
        scores = torch.matmul(q_groups, keys.permute(0, 2, 3, 1))  # [num_seqs, kv_heads, group, max_seq_len]
        bias = meta.decode_bias(self.sliding_window)
        if bias is not None:
            scores = scores + (bias if bias.dtype == scores.dtype else bias.to(scores.dtype))
        out = torch.matmul(scores.softmax(dim=-1), values.transpose(1, 2))  # [.., group, head_dim]
        return out.reshape(num_seqs, self.num_heads * self.head_dim)


def _gather(cache: torch.Tensor, kv_slots: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`[num_seqs, max_seq_len, num_kv_heads, head_dim]` context rows of `cache` (one index_select,
    ~3x cheaper than advanced indexing with a 2-D index)."""
    rows = cache.index_select(0, kv_slots.view(-1)).view(*kv_slots.shape, *cache.shape[1:])
    return rows if rows.dtype == dtype else rows.to(dtype)
