"""Logprobs of chosen tokens and their best alternatives, from RAW logits (vLLM's "raw_logprobs").

The logprob of token t is `logits[t] - logsumexp(logits)`, before any penalty, temperature or filter.
Ranks are 1-based: 1 + the number of tokens with a strictly larger logit (so tied tokens share a rank
and the argmax always has rank 1; vLLM agrees wherever there are no ties).
"""

from __future__ import annotations

import torch

from mixserve.outputs import Logprob, TokenLogprobs
from mixserve.sample.processors import topk_rows

SCRATCH_ELEMENTS = 1 << 22
"""Rows are processed in chunks of at most this many logits (16 MB of float32 scratch, reused): bounds
the memory of long prompts and keeps the allocator from mapping fresh pages for every chunk."""


@torch.no_grad()
def gather_logprobs(logits: torch.Tensor, token_ids: list[int], num_top: list[int]) -> list[TokenLogprobs]:
    """For each row of `logits` `[num_rows, vocab_size]`: the logprob and rank of `token_ids[i]` plus
    the `num_top[i]` most likely tokens (the chosen token first; one entry if it is among them)."""
    num_rows, vocab_size = logits.shape
    if not len(token_ids) == len(num_top) == num_rows:
        raise ValueError(f"logits {tuple(logits.shape)}, {len(token_ids)} token ids, {len(num_top)} counts")
    rows_per_chunk = max(1, SCRATCH_ELEMENTS // vocab_size)
    scratch = torch.empty(min(rows_per_chunk, num_rows), vocab_size)  # [rows_per_chunk, vocab_size]
    out: list[TokenLogprobs] = []
    for start in range(0, num_rows, rows_per_chunk):
        end = min(start + rows_per_chunk, num_rows)
        out += _gather_chunk(logits[start:end].float(), token_ids[start:end], num_top[start:end],
                             scratch[:end - start])
    return out


def _gather_chunk(logits: torch.Tensor, token_ids: list[int], num_top: list[int],
                  scratch: torch.Tensor) -> list[TokenLogprobs]:
    row_max = logits.amax(dim=1, keepdim=True)
    torch.sub(logits, row_max, out=scratch)
    lse = row_max + torch.exp(scratch, out=scratch).sum(dim=1, keepdim=True).log()  # [num_rows, 1]
    chosen = logits.gather(1, torch.tensor(token_ids, dtype=torch.long).unsqueeze(1))  # [num_rows, 1]
    # counting through a float32 mask is exact below 2**24 and far faster than summing a bool tensor
    ranks = (torch.gt(logits, chosen, out=scratch).sum(dim=1) + 1).long().tolist()
    chosen_lps = (chosen - lse).squeeze(1).tolist()
    out = [{t: Logprob(lp, rank)} for t, lp, rank in zip(token_ids, chosen_lps, ranks)]
    k = max(num_top, default=0)
    if k == 0:
        return out
    top_values, top_ids = topk_rows(logits, min(k, logits.shape[1]))  # [num_rows, k]
    # every token above a top-k member is in the top-k, so its rank is counted among them
    top_ranks = ((top_values.unsqueeze(1) > top_values.unsqueeze(2)).sum(dim=2) + 1).tolist()
    top_lps = (top_values - lse).tolist()
    for i, entry in enumerate(out):
        for t, lp, rank in zip(top_ids[i, :num_top[i]].tolist(), top_lps[i], top_ranks[i]):
            entry.setdefault(t, Logprob(lp, rank))
    return out


def sample_logprobs(logits: torch.Tensor, num_logprobs: list[int | None],
                    token_ids: list[int]) -> list[TokenLogprobs | None]:
    """Logprobs of the sampled `token_ids` for the rows whose `num_logprobs` is not None."""
    asked = [i for i, k in enumerate(num_logprobs) if k is not None]
    out: list[TokenLogprobs | None] = [None] * len(token_ids)
    if not asked:
        return out
    rows = logits if len(asked) == len(token_ids) else logits[asked]
    found = gather_logprobs(rows, [token_ids[i] for i in asked], [num_logprobs[i] or 0 for i in asked])
    for i, entry in zip(asked, found):
        out[i] = entry
    return out


def prompt_logprobs(logits: torch.Tensor, next_token_ids: list[int], num_top: int) -> list[TokenLogprobs]:
    """logits `[n, vocab_size]` at positions 0..n-1 of a prompt; `next_token_ids[i]` is the token at
    i+1. Returns per position the logprob + rank of the actual next token and the `num_top` best."""
    return gather_logprobs(logits, next_token_ids, [num_top] * len(next_token_ids))
