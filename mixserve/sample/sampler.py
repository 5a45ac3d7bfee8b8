"""The sampler: logits of one step -> one token per sequence (+ logprobs), batched and deterministic.

Pipeline per row (vLLM v1's order): penalties -> suppression -> temperature -> min-p -> top-k -> top-p
(definitions in `processors`), then an inverse-CDF draw: ONE uniform `u` per row, and the token is the
first id whose cumulative filtered probability, in token-id order, exceeds `u * total`. A row with a
`generator` draws `u` from it alone, so the same seed gives the same tokens whatever else is in the batch
and wherever the row sits. Greedy rows (temperature < 1e-5 or top_k == 1) take the argmax of the
penalised logits (lowest id on ties) and draw nothing.

Rows are regrouped in a reused workspace `[num_seqs, vocab_size]` so each group is one slice:
dense (no top-k/top-p: the whole distribution is sampled), nucleus (top-p only), top-k (maybe with
top-p), greedy. Top-k and top-p rows work on their best candidates (one batched blockwise topk) and
touch the full vocabulary only when their kept set may extend past them: top-k ties with the k-th
token, or a nucleus wider than the candidates (`processors.keep_top_p_wide`). Uniforms are float64
(`torch.rand(1, generator=g, dtype=torch.float64)`), so that no token of a large vocabulary falls
between two representable uniforms. Tensors are CPU tensors.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from mixserve.outputs import TokenLogprobs
from mixserve.sample.logprobs import sample_logprobs
from mixserve.sample.processors import (
    apply_penalties,
    argmax_rows,
    float32_below,
    keep_top_p_rows,
    needs_penalties,
    order_candidates,
    row_mass,
    top_p_cutoff,
    topk_rows,
)
from mixserve.sampling_params import SamplingParams

GREEDY_TEMPERATURE = 1e-5
"""Temperatures below this sample greedily (vLLM's epsilon)."""
NUM_NUCLEUS_CANDIDATES = 64
"""Top-p rows look for their nucleus among this many best tokens first (a cheap blockwise topk)..."""
NUM_WIDE_CANDIDATES = 1024
"""...then, where it is wider, among this many, and past that with the banded search of the row."""
CDF_BLOCK = 1024
"""Dense draws find the block of this many tokens first, then the token inside it."""

DENSE, NUCLEUS, TOP_K, GREEDY = range(4)


@dataclass
class SamplingRow:
    """What the sampler needs about one sequence that samples this step."""

    params: SamplingParams
    prompt_token_ids: Sequence[int]
    """For the repetition penalty (applies to prompt + output, as in vLLM/HF)."""
    output_token_ids: Sequence[int]
    """Generated so far (presence/frequency penalties apply to these only)."""
    generator: torch.Generator | None
    """Per-request generator when `params.seed` is set, else None (the sampler's default is used)."""
    suppress_token_ids: tuple[int, ...] = ()
    """Ids that must not be sampled this step, e.g. EOS/stop ids while len(output) < min_tokens."""
    allowed: torch.Tensor | None = None
    """bool `[vocab_size]`: only these tokens may be sampled (a structured-output constraint); None: all."""


@dataclass
class SamplerOutput:
    """One sampled token per row, and its logprobs where the row asked (None elsewhere)."""

    token_ids: list[int]
    logprobs: list[TokenLogprobs | None]


def row_kind(params: SamplingParams, vocab_size: int) -> int:
    """DENSE, NUCLEUS, TOP_K or GREEDY: which group of the workspace a row samples in."""
    if params.greedy or params.temperature < GREEDY_TEMPERATURE:
        return GREEDY
    if params.top_k is not None and params.top_k < vocab_size:
        return TOP_K
    return NUCLEUS if params.top_p < 1.0 else DENSE


class Sampler:
    """Samples one token per row of a logits batch. Holds a workspace reused across steps."""

    def __init__(self, default_generator: torch.Generator | None = None) -> None:
        self.default_generator = default_generator
        """Source of uniforms for rows without their own generator (None: torch's global RNG)."""
        self._workspace = torch.empty(0)

    @torch.no_grad()
    def __call__(self, logits: torch.Tensor, rows: list[SamplingRow]) -> SamplerOutput:
        """logits: float32 `[num_seqs, vocab_size]`, one row per SamplingRow (never modified)."""
        if logits.dim() != 2 or logits.shape[0] != len(rows):
            raise ValueError(f"logits {tuple(logits.shape)} do not match {len(rows)} rows")
        vocab_size = logits.shape[1]
        if all(row_kind(r.params, vocab_size) == GREEDY and not needs_penalties(r) and r.allowed is None
               for r in rows):
            token_ids = argmax_rows(logits).tolist()  # fast path: nothing to modify
        else:
            token_ids = self._sample(logits, rows)
        logprobs = sample_logprobs(logits, [r.params.logprobs for r in rows], token_ids)
        return SamplerOutput(token_ids=token_ids, logprobs=logprobs)

    def _sample(self, logits: torch.Tensor, rows: list[SamplingRow]) -> list[int]:
        num_seqs, vocab_size = logits.shape
        kinds = [row_kind(r.params, vocab_size) for r in rows]
        # workspace row -> input row: grouped by kind, equal min_p adjacent (filtered in one op)
        order = sorted(range(num_seqs), key=lambda i: (kinds[i], rows[i].params.min_p))
        ordered = [rows[i] for i in order]
        inv_temperature = [1.0 if kinds[i] == GREEDY else 1.0 / rows[i].params.temperature for i in order]
        z = self._workspace_for(num_seqs, vocab_size)  # [num_seqs, vocab_size]
        _fill_scaled(z, logits, order, inv_temperature)
        if any(needs_penalties(r) for r in rows):
            apply_penalties(z, ordered, inv_temperature)
        _apply_allowed(z, ordered)
        num_random = num_seqs - kinds.count(GREEDY)
        tokens = torch.empty(num_seqs, dtype=torch.long)
        if num_random < num_seqs:
            tokens[num_random:] = argmax_rows(z[num_random:])
        if num_random:
            u = self._uniforms(ordered[:num_random])
            tokens[:num_random] = _sample_random(z[:num_random], ordered[:num_random],
                                                 kinds.count(DENSE), kinds.count(NUCLEUS), u)
        token_ids = [0] * num_seqs
        for pos, token in zip(order, tokens.tolist()):
            token_ids[pos] = token
        return token_ids

    def _workspace_for(self, num_seqs: int, vocab_size: int) -> torch.Tensor:
        size = num_seqs * vocab_size
        if self._workspace.numel() < size:
            self._workspace = torch.empty(size, dtype=torch.float32)
        return self._workspace[:size].view(num_seqs, vocab_size)

    def _uniforms(self, rows: list[SamplingRow]) -> torch.Tensor:
        """`[num_rows]` float64 in [0, 1): one per row, from its own generator when it has one."""
        u = torch.empty(len(rows), dtype=torch.float64)
        shared = [i for i, r in enumerate(rows) if r.generator is None]
        if shared:
            u[shared] = torch.rand(len(shared), generator=self.default_generator, dtype=torch.float64)
        for i, row in enumerate(rows):
            if row.generator is not None:
                u[i] = torch.rand(1, generator=row.generator, dtype=torch.float64)
        return u


def _apply_allowed(z: torch.Tensor, rows: list[SamplingRow]) -> None:
    """Constrained rows of `z` `[num_seqs, vocab_size]`: every token outside `row.allowed` gets -inf
    (before any filter, so top-k/top-p/min-p see only allowed tokens). One op for all such rows."""
    at = [j for j, row in enumerate(rows) if row.allowed is not None]
    if not at:
        return
    # stacked as uint8: torch's multi-threaded cat of bool tensors is orders of magnitude slower
    allowed = torch.stack([rows[j].allowed.view(torch.uint8) for j in at]).view(torch.bool)  # type: ignore[union-attr]
    if len(at) == z.shape[0]:
        z.masked_fill_(allowed.logical_not_(), float("-inf"))
    else:
        index = torch.tensor(at, dtype=torch.long)
        z[index] = z[index].masked_fill_(allowed.logical_not_(), float("-inf"))


def _fill_scaled(z: torch.Tensor, logits: torch.Tensor, order: list[int],
                 inv_temperature: list[float]) -> None:
    """`z[i] = logits[order[i]] * inv_temperature[i]`, one op per run of consecutive input rows."""
    scale = torch.tensor(inv_temperature, dtype=z.dtype).unsqueeze(1)  # [num_seqs, 1]
    start = 0
    for end in range(1, len(order) + 1):
        if end == len(order) or order[end] != order[end - 1] + 1:
            first = order[start]
            torch.mul(logits[first:first + end - start], scale[start:end], out=z[start:end])
            start = end


def _sample_random(z: torch.Tensor, rows: list[SamplingRow], num_dense: int, num_nucleus: int,
                   u: torch.Tensor) -> torch.Tensor:
    """Sample rows of scaled, penalised logits `z` `[num_rows, vocab_size]` grouped dense, nucleus,
    top-k; `z` is overwritten with probabilities where the whole row is needed."""
    num_rows, vocab_size = z.shape
    num_head = num_dense + num_nucleus  # rows whose whole distribution is needed
    head, tail = slice(num_dense, num_head), slice(num_head, num_rows)
    min_p = torch.tensor([r.params.min_p for r in rows], dtype=z.dtype)
    top_p = torch.tensor([r.params.top_p for r in rows], dtype=torch.float64)
    tokens = torch.empty(num_rows, dtype=torch.long)
    values, ids = torch.empty(0, 0), torch.empty(0, 0, dtype=torch.long)
    if num_head < num_rows or num_nucleus:
        max_top_k = max((r.params.top_k or 0) for r in rows[tail]) if num_head < num_rows else 0
        num_cand = min(vocab_size, max(max_top_k + 1, NUM_NUCLEUS_CANDIDATES if num_nucleus else 0))
        values, ids = topk_rows(z[num_dense:], num_cand)  # [num_rows - num_dense, num_cand]
    if num_head:
        row_max = torch.cat([z[:num_dense].amax(dim=1), values[:num_nucleus, :1].flatten()])
        e_head = z[:num_head].sub_(row_max.unsqueeze(1))
        torch.exp(e_head, out=e_head)  # probabilities e, [num_head, vocab_size]
        for start, end, value in _runs(min_p[:num_head].tolist()):
            if value > 0:  # keeps e > the float32 just below min_p, i.e. e >= min_p, in one pass
                torch.threshold_(z[start:end], float32_below(value), 0.0)
    if num_dense:
        tokens[:num_dense] = sample_dense(z[:num_dense], u[:num_dense])
    wide = []  # rows whose kept set reaches past the candidates: drawn from the whole row
    if num_nucleus:
        tokens[head], unresolved = _sample_nucleus(z[head], ids[:num_nucleus], top_p[head], u[head])
        if unresolved:
            at = [num_dense + i for i, *_ in unresolved]
            total = torch.tensor([t for _, t, _, _ in unresolved], dtype=torch.float64)
            keep_top_p_rows(z, at, top_p[at], total, [m for *_, m, _ in unresolved], [v for *_, v in unresolved])
            wide += at
    if num_head < num_rows:
        tokens[tail], spilled = _sample_top_k(values[num_nucleus:], ids[num_nucleus:], rows[tail],
                                              min_p[tail], top_p[tail], u[tail], vocab_size)
        if spilled:
            at = [num_head + i for i, _ in spilled]
            row_max = values[[num_nucleus + i for i, _ in spilled], :1]
            z[at] = _spilled_probabilities(z[at], row_max, [t for _, t in spilled], top_p[at])
            wide += at
    if wide:
        tokens[wide] = sample_dense(z, u[wide], wide)
    return tokens


def _spilled_probabilities(z: torch.Tensor, row_max: torch.Tensor, thresholds: list[float],
                           top_p: torch.Tensor) -> torch.Tensor:
    """Top-k rows `z` `[num_rows, vocab_size]` (a copy) whose k-th token ties with tokens past the
    candidates: their whole rows of kept probabilities (`e >= threshold`, then top-p)."""
    z.sub_(row_max)
    torch.exp(z, out=z)
    z.masked_fill_(z < torch.tensor(thresholds, dtype=z.dtype).unsqueeze(1), 0.0)
    at = (top_p < 1.0).nonzero().flatten().tolist()
    if at:
        keep_top_p_rows(z, at, top_p[at], row_mass(z[at]), [0.0] * len(at), [math.inf] * len(at))
    return z


def _runs(values: list[float]) -> list[tuple[int, int, float]]:
    """(start, end, value) of each run of equal consecutive values."""
    runs: list[tuple[int, int, float]] = []
    for i, value in enumerate(values):
        if runs and runs[-1][2] == value:
            runs[-1] = (runs[-1][0], i + 1, value)
        else:
            runs.append((i, i + 1, value))
    return runs


def _sample_nucleus(e: torch.Tensor, ids: torch.Tensor, top_p: torch.Tensor,
                    u: torch.Tensor) -> tuple[torch.Tensor, list[tuple[int, float, float, float]]]:
    """Top-p rows: `e` `[num_rows, vocab_size]` probabilities (min-p applied), candidate `ids`
    `[num_rows, num_cand]`; rows not resolved there get NUM_WIDE_CANDIDATES. Returns tokens, and
    (row, total mass, candidates' mass, smallest candidate) for rows whose cutoff lies past all
    candidates (their tokens are void)."""
    total = row_mass(e)  # [num_rows] float64
    tokens, unresolved = _resolve_nucleus(e, ids, top_p, total, u)
    num_wide = min(e.shape[1], NUM_WIDE_CANDIDATES)
    # a nucleus mostly made of the best candidates is likely a few hundred tokens: more candidates
    # settle it; a nearly flat one (little mass in the best candidates) goes to the banded search
    again = [i for i, t, head_mass, _ in unresolved if head_mass >= 0.5 * float(top_p[i]) * t]
    if again and ids.shape[1] < num_wide:
        e_again = e[again]  # [num_again, vocab_size] copy
        tokens[again], unresolved_again = _resolve_nucleus(
            e_again, e_again.topk(num_wide, dim=1).indices, top_p[again], total[again], u[again])
        unresolved = [info for info in unresolved if info[0] not in again]
        unresolved += [(again[i], t, m, v) for i, t, m, v in unresolved_again]
    return tokens, unresolved


def _resolve_nucleus(e: torch.Tensor, ids: torch.Tensor, top_p: torch.Tensor, total: torch.Tensor,
                     u: torch.Tensor) -> tuple[torch.Tensor, list[tuple[int, float, float, float]]]:
    num_cand = ids.shape[1]
    e_sorted, ids_sorted = order_candidates(e.gather(1, ids), ids)
    cut = top_p_cutoff(e_sorted, total, top_p)
    if num_cand == e.shape[1]:
        resolved = torch.ones_like(cut, dtype=torch.bool)
        cut = cut.clamp(max=num_cand - 1)  # rounding: never reached means keep all
    else:
        # a token outside the candidates could tie with the cutoff token only if the last candidate does
        at_cut = e_sorted.gather(1, cut.clamp(max=num_cand - 1).unsqueeze(1)).squeeze(1)
        resolved = (cut < num_cand) & (at_cut > e_sorted[:, -1])
    keep = torch.arange(num_cand).unsqueeze(0) <= cut.unsqueeze(1)
    tokens = sample_sparse(e_sorted * keep, ids_sorted, u)
    wide = (~resolved).nonzero().flatten().tolist()
    head_mass = e_sorted.sum(dim=1).tolist()
    return tokens, [(i, float(total[i]), head_mass[i], float(e_sorted[i, -1])) for i in wide]


def _sample_top_k(values: torch.Tensor, ids: torch.Tensor, rows: list[SamplingRow], min_p: torch.Tensor,
                  top_p: torch.Tensor, u: torch.Tensor, vocab_size: int
                  ) -> tuple[torch.Tensor, list[tuple[int, float]]]:
    """Top-k rows from their `[num_rows, num_cand]` best scaled logits. Returns tokens and, for rows
    where tokens beyond the candidates tie with the k-th (their tokens are void), (row, threshold)."""
    num_cand = ids.shape[1]
    e = (values - values[:, :1]).exp()  # [num_rows, num_cand]
    kth = torch.tensor([r.params.top_k - 1 for r in rows if r.params.top_k is not None]).unsqueeze(1)
    threshold = torch.maximum(e.gather(1, kth), min_p.unsqueeze(1))  # [num_rows, 1]
    spill = (e[:, -1:] >= threshold).squeeze(1) & (num_cand < vocab_size)
    e_sorted, ids_sorted = order_candidates(torch.where(e >= threshold, e, 0.0), ids)
    cut = top_p_cutoff(e_sorted, None, top_p).clamp(max=num_cand - 1)
    cut = torch.where(top_p < 1.0, cut, num_cand - 1)
    keep = torch.arange(num_cand).unsqueeze(0) <= cut.unsqueeze(1)
    tokens = sample_sparse(e_sorted * keep, ids_sorted, u)
    spilled = [(i, float(threshold[i])) for i in spill.nonzero().flatten().tolist()]
    return tokens, spilled


def sample_dense(e: torch.Tensor, u: torch.Tensor, rows: list[int] | None = None) -> torch.Tensor:
    """Inverse-CDF draw over whole rows of non-negative weights `e` `[num_seqs, vocab_size]`
    (contiguous; only `rows` of it if given, without copying them) in id order: block sums locate the
    block of `CDF_BLOCK` tokens, a cumsum inside it the token."""
    vocab_size = e.shape[1]
    if vocab_size <= CDF_BLOCK:
        cum = (e if rows is None else e[rows]).double().cumsum(dim=1)  # [num_rows, vocab_size]
        return search_cdf(cum, u * cum[:, -1])
    block_cum = _block_mass(e, rows).double().cumsum(dim=1)  # [num_rows, num_blocks]
    target = u * block_cum[:, -1]
    block = search_cdf(block_cum, target)
    before = block_cum.gather(1, (block - 1).clamp(min=0).unsqueeze(1)).squeeze(1)
    prefix = torch.where(block > 0, before, 0.0)  # mass of the blocks before the chosen one
    cols = block.unsqueeze(1) * CDF_BLOCK + torch.arange(CDF_BLOCK)  # [num_rows, CDF_BLOCK]
    inside = cols < vocab_size
    row_ids = torch.arange(e.shape[0]) if rows is None else torch.tensor(rows, dtype=torch.long)
    flat = row_ids.unsqueeze(1) * vocab_size + cols.clamp(max=vocab_size - 1)
    weights = e.view(-1).index_select(0, flat.flatten()).view(cols.shape).double() * inside
    return block * CDF_BLOCK + search_cdf(weights.cumsum(dim=1) + prefix.unsqueeze(1), target)


def _block_mass(e: torch.Tensor, rows: list[int] | None) -> torch.Tensor:
    """`[num_rows, num_blocks]` float32 sums of consecutive CDF_BLOCK tokens (the last block may be short)."""
    num_seqs, vocab_size = e.shape
    num_full = vocab_size // CDF_BLOCK
    if rows is None:
        parts = [e[:, :num_full * CDF_BLOCK].view(num_seqs, num_full, CDF_BLOCK).sum(dim=2)]
        if vocab_size % CDF_BLOCK:
            parts.append(e[:, num_full * CDF_BLOCK:].sum(dim=1, keepdim=True))
        return torch.cat(parts, dim=1)
    mass = torch.empty(len(rows), num_full + (vocab_size % CDF_BLOCK > 0), dtype=e.dtype)
    for i, row in enumerate(rows):
        torch.sum(e[row, :num_full * CDF_BLOCK].view(num_full, CDF_BLOCK), dim=1, out=mass[i, :num_full])
        if vocab_size % CDF_BLOCK:
            mass[i, num_full] = e[row, num_full * CDF_BLOCK:].sum()
    return mass


def sample_sparse(weights: torch.Tensor, ids: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF draw over candidate tokens: `weights` `[num_rows, num_cand]` (0 = filtered out) of
    token `ids`, taken in id order."""
    ids_sorted, by_id = ids.sort(dim=1)
    cum = weights.gather(1, by_id).double().cumsum(dim=1)  # [num_rows, num_cand]
    pos = search_cdf(cum, u * cum[:, -1])
    return ids_sorted.gather(1, pos.unsqueeze(1)).squeeze(1)


def search_cdf(cum: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """First index with `cum > target` per row of `cum` `[num_rows, n]`; when rounding puts the
    target at or past the total, the last index with positive mass. Never an index of zero mass."""
    total = cum[:, -1:].contiguous()
    target = target.unsqueeze(1)
    hit = torch.searchsorted(cum, target, right=True)
    last = torch.searchsorted(cum, total)  # first index reaching the total
    return torch.where(target < total, hit, last).squeeze(1)
