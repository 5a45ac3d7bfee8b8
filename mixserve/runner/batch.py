"""Attention metadata for a group of scheduled sequences."""

from __future__ import annotations

import torch

from mixserve.engine.scheduler import ScheduledSeq
from mixserve.layers.attention import AttentionMetadata


def build_group(seqs: list[ScheduledSeq], block_size: int) -> AttentionMetadata:
    """Metadata for sequences attended together; `slot_mapping` is left empty (set per batch).

    `kv_slots[i, j]` is the cache slot of token j of sequence i: block `table[j // block_size]`,
    offset `j % block_size`. A lone chunk with nothing cached before it needs no gather.
    """
    query_lens = [s.num_tokens for s in seqs]
    seq_lens = [s.start_pos + s.num_tokens for s in seqs]
    empty = torch.empty(0, dtype=torch.long)
    if len(seqs) == 1 and seqs[0].start_pos == 0:
        return AttentionMetadata(query_lens, seq_lens, slot_mapping=empty, kv_slots=None, q_index=None)
    max_seq = max(seq_lens)
    num_table = -(-max_seq // block_size)
    tables = torch.zeros(len(seqs), num_table, dtype=torch.long)
    for i, seq in enumerate(seqs):
        table = seq.block_ids[:num_table]
        tables[i, :len(table)] = torch.tensor(table, dtype=torch.long)
    offsets = torch.arange(block_size, dtype=torch.long)
    kv_slots = (tables[:, :, None] * block_size + offsets).reshape(len(seqs), -1)[:, :max_seq]
    max_q = max(query_lens)
    q_index = None
    if any(q != max_q for q in query_lens):
        q_index = torch.tensor([i * max_q + t for i, n in enumerate(query_lens) for t in range(n)])
    return AttentionMetadata(query_lens, seq_lens, slot_mapping=empty, kv_slots=kv_slots.contiguous(),
                             q_index=q_index)
