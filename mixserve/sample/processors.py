"""Logits processors: penalties and suppression (sparse, in place), and the min-p / top-k / top-p filters.

Penalties act on temperature-scaled logits `z = logits / temperature`: the repetition penalty commutes
with a positive scale and the additive penalties are scaled by it, so the result equals vLLM's order
(penalise, then divide by temperature) up to rounding. They touch only the tokens that were seen.

The filters act on unnormalised probabilities `e = exp(z - max z)` (float32), with vLLM v1's order and
definitions; ties are broken by token id so that every result is deterministic:
- min-p keeps `e >= min_p` (`p_i >= min_p * p_max`);
- top-k keeps `e >= ` the k-th largest `e`: tokens tied with the k-th are all kept (as vLLM);
- top-p, over what min-p and top-k kept, keeps the shortest prefix of tokens ordered by
  (probability desc, id asc) whose mass reaches `top_p` of the kept mass (vLLM's `cumsum <= 1 - p`
  rule on an ascending sort, with a stable order for ties).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:
    from mixserve.sample.sampler import SamplingRow

SUBSAMPLE = 8192
"""Wide top-p rows estimate their cutoff from every `vocab_size // SUBSAMPLE`-th token."""


def apply_penalties(z: torch.Tensor, rows: Sequence[SamplingRow], inv_temperature: Sequence[float]) -> None:
    """Penalise and suppress tokens of `z` `[num_seqs, vocab_size]` (contiguous) in place.

    Row `i` of `z` holds `logits * inv_temperature[i]` for `rows[i]`. Repetition penalty applies to
    tokens of prompt + output (positive logits divided, the others multiplied); frequency and presence
    penalties to output tokens (`count * frequency + presence` subtracted); suppressed ids get -inf.
    Token ids outside the vocabulary are ignored.
    """
    vocab_size = z.shape[1]
    flat = z.view(-1)
    _logit_bias(flat, rows, vocab_size, inv_temperature)
    _repetition(flat, rows, vocab_size)
    _frequency_presence(flat, rows, vocab_size, inv_temperature)
    chosen = [i for i, row in enumerate(rows) if row.suppress_token_ids]
    if chosen:
        suppressed = _positions([rows[i].suppress_token_ids for i in chosen], chosen, vocab_size)
        flat.scatter_(0, suppressed, float("-inf"))


def needs_penalties(row: SamplingRow) -> bool:
    """True when `apply_penalties` would change this row's logits."""
    p = row.params
    return (p.repetition_penalty != 1.0 or p.frequency_penalty != 0.0 or p.presence_penalty != 0.0
            or bool(row.suppress_token_ids) or bool(p.logit_bias))


def _logit_bias(flat: torch.Tensor, rows: Sequence[SamplingRow], vocab_size: int,
                inv_temperature: Sequence[float]) -> None:
    """Add each row's bias to its raw logits: `z += bias / temperature` (z is already scaled)."""
    chosen = [i for i, row in enumerate(rows) if row.params.logit_bias]
    if not chosen:
        return
    ids: list[Sequence[int]] = [[t for t, _ in rows[i].params.logit_bias] for i in chosen]
    values = [b * inv_temperature[i] for i in chosen for t, b in rows[i].params.logit_bias if 0 <= t < vocab_size]
    flat.index_add_(0, _positions(ids, chosen, vocab_size), torch.tensor(values, dtype=flat.dtype))


def _positions(id_lists: list[Sequence[int]], row_ids: list[int], vocab_size: int) -> torch.Tensor:
    """Flat positions `row * vocab_size + id` of every id of `id_lists[j]` in row `row_ids[j]`; ids
    outside the vocabulary are dropped, repeats kept. Built in numpy: no thread pool for small work."""
    lengths = [len(id_list) for id_list in id_lists]
    ids = np.fromiter(itertools.chain.from_iterable(id_lists), dtype=np.int64, count=sum(lengths))
    rows = np.repeat(np.asarray(row_ids, dtype=np.int64), lengths)
    valid = (ids >= 0) & (ids < vocab_size)
    return torch.from_numpy(rows[valid] * vocab_size + ids[valid])


def _repetition(flat: torch.Tensor, rows: Sequence[SamplingRow], vocab_size: int) -> None:
    chosen = [i for i, row in enumerate(rows) if row.params.repetition_penalty != 1.0]
    if not chosen:
        return
    seen = _positions([[*rows[i].prompt_token_ids, *rows[i].output_token_ids] for i in chosen],
                      chosen, vocab_size)
    penalty_by_row = torch.tensor([row.params.repetition_penalty for row in rows], dtype=flat.dtype)
    penalty = penalty_by_row[seen // vocab_size]
    # a repeated position reads the same old value and writes the same new one: no dedup needed
    values = flat.index_select(0, seen)  # advanced indexing is ~50x slower on a large flat tensor
    flat.scatter_(0, seen, torch.where(values > 0, values / penalty, values * penalty))


def _frequency_presence(flat: torch.Tensor, rows: Sequence[SamplingRow], vocab_size: int,
                        inv_temperature: Sequence[float]) -> None:
    chosen = [i for i, row in enumerate(rows) if row.output_token_ids
              and (row.params.frequency_penalty != 0.0 or row.params.presence_penalty != 0.0)]
    if not chosen:
        return
    generated = _positions([rows[i].output_token_ids for i in chosen], chosen, vocab_size)
    row_of = generated // vocab_size
    scale = torch.tensor(list(inv_temperature), dtype=flat.dtype)[row_of]  # they act on logits / T

    def by_row(values: list[float]) -> torch.Tensor:
        return torch.tensor(values, dtype=flat.dtype)[row_of] * scale

    # presence once per token (a repeated position writes the same value), frequency per occurrence
    presence = by_row([row.params.presence_penalty for row in rows])
    flat.scatter_(0, generated, flat.index_select(0, generated) - presence)
    flat.index_add_(0, generated, by_row([row.params.frequency_penalty for row in rows]), alpha=-1.0)


def order_candidates(e: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sort candidate tokens `[num_seqs, num_candidates]` by (probability desc, id asc)."""
    ids_sorted, by_id = ids.sort(dim=1)
    e_sorted, order = e.gather(1, by_id).sort(dim=1, descending=True, stable=True)
    return e_sorted, ids_sorted.gather(1, order)


def top_p_cutoff(e_sorted: torch.Tensor, total: torch.Tensor | None, top_p: torch.Tensor) -> torch.Tensor:
    """Index of the last kept token per row: the first position where the cumulative mass of
    `e_sorted` `[num_seqs, num_candidates]` (ordered as `order_candidates`) reaches `top_p * total`;
    `num_candidates` where it never does (the boundary lies beyond the candidates). `total` None:
    the candidates are the whole kept set."""
    cum = e_sorted.double().cumsum(dim=1)  # [num_seqs, num_candidates]
    total = cum[:, -1] if total is None else total.double()
    target = (top_p.double() * total).unsqueeze(1)
    return torch.searchsorted(cum, target).squeeze(1)


def argmax_rows(x: torch.Tensor, block: int = 1024) -> torch.Tensor:
    """`x.argmax(dim=1)` (lowest id on ties) of `x` `[num_rows, vocab_size]` through block maxima:
    one fast `amax` pass, then argmax inside the first block holding the row maximum."""
    num_rows, vocab_size = x.shape
    num_full = vocab_size // block
    if num_rows * vocab_size < 1 << 20 or num_full < 2 or not x.is_contiguous():
        return x.argmax(dim=1)
    maxima = x[:, :num_full * block].view(num_rows, num_full, block).amax(dim=2)  # [num_rows, num_blocks]
    if vocab_size % block:
        maxima = torch.cat([maxima, x[:, num_full * block:].amax(dim=1, keepdim=True)], dim=1)
    first = maxima.argmax(dim=1)
    # past the end of the last block, cols repeat the last token, which argmax never prefers
    cols = (first.unsqueeze(1) * block + torch.arange(block)).clamp(max=vocab_size - 1)
    return first * block + x.gather(1, cols).argmax(dim=1)


def topk_rows(x: torch.Tensor, k: int, block: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """`x.topk(k, dim=1)` of `x` `[num_rows, vocab_size]`: exact values, descending (which of tied
    tokens is arbitrary, as in torch). Only the k blocks with the largest maxima can hold them, so
    after one `amax` pass the search reads k * block values per row."""
    num_rows, vocab_size = x.shape
    num_full = vocab_size // block
    if num_full < 16 * k or not x.is_contiguous():
        return x.topk(k, dim=1)
    maxima = x[:, :num_full * block].view(num_rows, num_full, block).amax(dim=2)  # [num_rows, num_blocks]
    blocks = maxima.topk(k, dim=1).indices  # [num_rows, k]
    cols = (blocks.unsqueeze(2) * block + torch.arange(block)).view(num_rows, k * block)
    tail = torch.arange(num_full * block, vocab_size).expand(num_rows, -1)
    cols = torch.cat([cols, tail], dim=1)  # [num_rows, k * block + tail]
    values, pos = x.gather(1, cols).topk(k, dim=1)
    return values, cols.gather(1, pos)


def row_mass(e: torch.Tensor, block: int = 1024) -> torch.Tensor:
    """Sum of each row of `e` `[num_rows, vocab_size]` as float64: float32 sums of blocks (one
    thread each, so the result never depends on the batch around a row) added in float64."""
    num_rows, vocab_size = e.shape
    num_full = vocab_size // block
    mass = e[:, :num_full * block].view(num_rows, num_full, block).sum(dim=2).double().sum(dim=1)
    if vocab_size % block:
        mass += e[:, num_full * block:].sum(dim=1).double()
    return mass


def keep_top_p_by_sort(e: torch.Tensor, top_p: torch.Tensor, total: torch.Tensor) -> None:
    """Exact top-p over whole rows `e` `[num_rows, vocab_size]` of (already min-p/top-k filtered)
    probabilities of mass `total`: zero every token after the cutoff, in place, by sorting the rows."""
    e_sorted, ids = e.sort(dim=1, descending=True, stable=True)
    cut = top_p_cutoff(e_sorted, total, top_p).clamp(max=e.shape[1] - 1)  # never reached: keep all
    cut = torch.where(top_p < 1.0, cut, e.shape[1] - 1)
    keep = torch.arange(e.shape[1]).unsqueeze(0) <= cut.unsqueeze(1)
    e.scatter_(1, ids, e_sorted * keep)


def keep_top_p_rows(e: torch.Tensor, rows: list[int], top_p: torch.Tensor, total: torch.Tensor,
                    head_mass: list[float], head_min: list[float]) -> None:
    """Exact top-p, in place, over `rows` of probabilities `e` `[num_seqs, vocab_size]` whose cutoff
    lies below their best tokens (`head_*` per row as in `keep_top_p_wide`; 0 and inf when unknown):
    small vocabularies are sorted in one batch, large ones searched row by row."""
    if e.shape[1] // SUBSAMPLE < 4:
        chosen = e[rows]  # [num_chosen, vocab_size] copy
        keep_top_p_by_sort(chosen, top_p, total)
        e[rows] = chosen
        return
    for i, row in enumerate(rows):
        keep_top_p_wide(e[row], float(top_p[i]), float(total[i]), head_mass[i], head_min[i])


def keep_top_p_wide(e: torch.Tensor, top_p: float, total: float, head_mass: float, head_min: float) -> None:
    """Exact top-p over one row `e` `[vocab_size]` of filtered probabilities of mass `total` whose
    cutoff lies below its best tokens (those with `e >= head_min`, of mass `head_mass`): zero every
    token after the cutoff, in place. A strided subsample of the rest estimates where the cutoff falls
    (with its standard error); exact masses over the row confirm that it lies in a band of values
    `[lo, hi]`, and only the band is sorted. A missed estimate sorts the whole row."""
    stride = e.numel() // SUBSAMPLE
    target = torch.tensor([top_p * total], dtype=torch.float64)
    band = _estimate_band(e[::stride], (top_p * total - head_mass) / (total - head_mass), head_min) \
        if stride >= 4 and total > head_mass else None
    if band is not None:
        lo, hi = band
        above = torch.threshold(e, hi, 0.0)  # e where e > hi
        from_lo = torch.threshold(e, float32_below(lo), 0.0)  # e where e >= lo
        mass_hi = float(above.double().sum())  # float64: the cutoff must not move by rounding
        # a float32 sum with slack is enough to know that the cutoff is not below lo
        if mass_hi < float(target) and float(from_lo.sum()) > float(target) * (1 + 1e-5):
            band_ids = from_lo.sub_(above).gt_(0.0).nonzero().flatten()  # lo <= e <= hi, ids ascending
            band_sorted, order = e[band_ids].sort(descending=True, stable=True)
            cum = band_sorted.double().cumsum(0).add_(mass_hi)
            cut = min(int(torch.searchsorted(cum, target)), band_ids.numel() - 1)
            torch.threshold_(e, float32_below(lo), 0.0)
            e.scatter_(0, band_ids[order[cut + 1:]], 0.0)
            return
    keep_top_p_by_sort(e.unsqueeze(0), torch.tensor([top_p], dtype=torch.float64), target / top_p)


def _estimate_band(sample: torch.Tensor, fraction: float, head_min: float) -> tuple[float, float] | None:
    """Values `(lo, hi)` between which the token lies where the mass of the tokens below `head_min`,
    taken from the top, reaches `fraction` of theirs: 4 standard errors of the estimate either side."""
    if not 0.0 < fraction < 1.0:
        return None
    w = sample[sample < head_min].sort(descending=True).values.double()  # [<= SUBSAMPLE]
    if w.numel() == 0 or float(w.sum()) <= 0.0:
        return None
    cum = w.cumsum(0).div_(w.sum())
    j = int(torch.searchsorted(cum, torch.tensor([fraction], dtype=torch.float64)))
    inside = (torch.arange(w.numel()) <= j).double()
    error = 4.0 * float((w * (inside - fraction)).square().sum().sqrt() / w.sum()) + 1e-6
    bounds = torch.tensor([fraction - error, fraction + error], dtype=torch.float64)
    i_hi, i_lo = torch.searchsorted(cum, bounds).tolist()
    hi = float(w[i_hi - 2]) if i_hi >= 2 else head_min
    lo = float(w[i_lo + 2]) if i_lo + 2 < w.numel() else 0.0
    return lo, hi


def float32_below(x: float) -> float:
    """The largest float32 below float32(x): `e > float32_below(x)` is `e >= x` for float32 `e`."""
    x32 = torch.tensor(x, dtype=torch.float32)
    return float(torch.nextafter(x32, torch.tensor(float("-inf"))))
