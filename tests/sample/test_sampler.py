"""Sampler against plain reference implementations: argmax, hand-computed penalties, filters written
as loops over sorted lists (and vLLM's own top-p rule), exact inverse-CDF tokens for known uniforms,
empirical distributions, seeded reproducibility, logprobs vs torch.log_softmax."""

from __future__ import annotations

import math

import pytest
import torch

from mixserve.sample import Sampler, SamplingRow, processors, prompt_logprobs
from mixserve.sample.processors import (
    apply_penalties,
    argmax_rows,
    keep_top_p_by_sort,
    keep_top_p_wide,
    row_mass,
    topk_rows,
)
from mixserve.sample.sampler import NUM_NUCLEUS_CANDIDATES
from mixserve.sampling_params import SamplingParams


def row(params: SamplingParams, *, prompt: list[int] | None = None, output: list[int] | None = None,
        seed: int | None = None, suppress: tuple[int, ...] = ()) -> SamplingRow:
    gen = None if seed is None else torch.Generator().manual_seed(seed)
    return SamplingRow(params, prompt or [], output or [], gen, suppress)


def uniform_of(seed: int) -> float:
    """The first uniform a row seeded with `seed` draws."""
    return torch.rand(1, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).item()


def ref_weights(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """Filtered unnormalised probabilities (float64) of rows `[num_rows, vocab_size]` by the documented
    definitions, with full sorts: no candidates, no bands."""
    vocab = logits.shape[1]
    z = logits * torch.tensor([1.0 / p.temperature for p in params], dtype=torch.float32).unsqueeze(1)
    e = (z - z.amax(dim=1, keepdim=True)).exp()
    keep = e >= torch.tensor([p.min_p for p in params]).unsqueeze(1)
    k = torch.tensor([vocab if p.top_k is None else min(p.top_k, vocab) for p in params])
    keep &= e >= e.sort(dim=1, descending=True).values.gather(1, (k - 1).unsqueeze(1))
    top_p = torch.tensor([p.top_p for p in params], dtype=torch.float64).unsqueeze(1)
    kept = torch.where(keep, e, 0.0).double()
    order = torch.sort(-kept, dim=1, stable=True).indices  # probability desc, id asc
    cum = kept.gather(1, order).cumsum(dim=1)
    size = (cum < top_p * cum[:, -1:]).sum(dim=1, keepdim=True) + 1  # shortest prefix reaching top_p
    nucleus = torch.zeros_like(keep).scatter_(1, order, torch.arange(vocab).expand_as(order) < size)
    keep &= nucleus | (top_p >= 1.0)
    return torch.where(keep, e, 0.0).double()


def ref_draws(weights: torch.Tensor, uniforms: list[float]) -> list[int]:
    """Per row, the first id whose cumulative weight exceeds u * total (the last id with weight if none)."""
    cum = weights.cumsum(dim=1)
    index = (cum <= torch.tensor(uniforms, dtype=torch.float64).unsqueeze(1) * cum[:, -1:]).sum(dim=1)
    last = weights.shape[1] - 1 - (weights.flip(1) > 0).int().argmax(dim=1)
    return torch.where(index < weights.shape[1], index, last).tolist()


def vllm_top_p_keep(logits: torch.Tensor, top_p: float) -> set[int]:
    """vLLM's rule: sort ascending, drop tokens whose cumulative probability is <= 1 - p, keep the last."""
    values, idx = logits.sort()
    cum = values.softmax(-1).cumsum(-1)
    drop = cum <= 1 - top_p
    drop[-1] = False
    return set(idx[~drop].tolist())


# ---------------------------------------------------------------------------------------------- greedy


def test_greedy_is_argmax_on_fast_and_general_paths() -> None:
    logits = torch.randn(16, 300, generator=torch.Generator().manual_seed(0))
    greedy = [row(SamplingParams(temperature=0.0)) for _ in range(16)]
    assert Sampler()(logits, greedy).token_ids == logits.argmax(1).tolist()
    mixed = greedy[:15] + [row(SamplingParams(temperature=1.0), seed=1)]  # forces the general path
    assert Sampler()(logits, mixed).token_ids[:15] == logits[:15].argmax(1).tolist()
    top_k_one = [row(SamplingParams(temperature=0.7, top_k=1))] * 16
    assert Sampler()(logits, top_k_one).token_ids == logits.argmax(1).tolist()


def test_greedy_ties_pick_lowest_id() -> None:
    logits = torch.tensor([[0.0, 2.0, 1.0, 2.0], [5.0, 5.0, 5.0, 5.0]])
    out = Sampler()(logits, [row(SamplingParams(temperature=0.0))] * 2)
    assert out.token_ids == [1, 0]
    out = Sampler()(logits, [row(SamplingParams(temperature=0.0, repetition_penalty=1.0,
                                                 presence_penalty=0.1), output=[3])] * 2)
    assert out.token_ids == [1, 0]  # general path: token 3 penalised


def test_blockwise_argmax_and_topk_match_torch() -> None:
    x = torch.randn(5, 300_001, generator=torch.Generator().manual_seed(1))  # a partial last block
    x[1, 5] = x[1, 300_000] = x[1].max() + 1  # tie across blocks: the lowest id wins
    x[2, 300_000] = 100.0  # the maximum in the partial block
    x[3] = 0.0  # all tied
    x[4] = (x[4] * 2).round()  # many ties
    assert argmax_rows(x).tolist() == x.argmax(1).tolist() == [int(x[0].argmax()), 5, 300_000, 0,
                                                                 int(x[4].argmax())]
    for k in (1, 7, 50):
        values, ids = topk_rows(x, k)
        assert torch.equal(values, x.topk(k, dim=1).values)
        assert torch.equal(x.gather(1, ids), values) and ids.unique(dim=1).shape == ids.shape


# ------------------------------------------------------------------------------------------- penalties


def test_repetition_penalty_hand_computed() -> None:
    logits = torch.tensor([[2.0, -1.0, 0.5, 0.0, 3.0, -2.0]])
    r = row(SamplingParams(repetition_penalty=2.0), prompt=[0, 1], output=[1, 3])
    z = logits.clone()
    apply_penalties(z, [r], [1.0])
    assert z.tolist() == [[1.0, -2.0, 0.5, 0.0, 3.0, -2.0]]
    z = logits * 0.5  # temperature 2: penalising scaled logits == scaling penalised logits
    apply_penalties(z, [r], [0.5])
    assert z.tolist() == [[0.5, -1.0, 0.25, 0.0, 1.5, -1.0]]


def test_frequency_and_presence_penalties_hand_computed() -> None:
    logits = torch.tensor([[1.0, 1.0, 1.0, 1.0, 1.0]])
    r = row(SamplingParams(frequency_penalty=0.5, presence_penalty=0.25), prompt=[0, 1], output=[2, 2, 4, 2])
    z = logits.clone()
    apply_penalties(z, [r], [1.0])
    assert z.tolist() == [[1.0, 1.0, 1.0 - 1.75, 1.0, 1.0 - 0.75]]  # prompt tokens untouched
    z = logits * 0.5
    apply_penalties(z, [r], [0.5])
    assert z.tolist() == [[0.5, 0.5, 0.5 - 0.875, 0.5, 0.5 - 0.375]]


def test_penalties_compose_in_vllm_order() -> None:
    logits = torch.tensor([[4.0, -1.0, 2.0], [4.0, -1.0, 2.0]])
    r = row(SamplingParams(repetition_penalty=2.0, frequency_penalty=1.0, presence_penalty=0.5),
            prompt=[2], output=[0, 0, 1])
    plain = row(SamplingParams())
    z = logits.clone()
    apply_penalties(z, [plain, r], [1.0, 1.0])
    # repetition first (4/2, -1*2, 2/2), then count * frequency + presence on output tokens
    assert z.tolist() == [[4.0, -1.0, 2.0], [2.0 - 2.5, -2.0 - 1.5, 1.0]]


def test_logit_bias_hand_computed_and_scaled_by_temperature() -> None:
    logits = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    r = row(SamplingParams(logit_bias={0: 5.0, 3: -1.0, 99: 7.0}))  # ids outside the vocabulary ignored
    z = logits.clone()
    apply_penalties(z, [r], [1.0])
    assert z.tolist() == [[6.0, 2.0, 3.0, 3.0]]
    z = logits * 0.5  # temperature 2: (logits + bias) / 2
    apply_penalties(z, [r], [0.5])
    assert z.tolist() == [[3.0, 1.0, 1.5, 1.5]]
    assert Sampler()(logits, [row(SamplingParams(temperature=0.0, logit_bias={1: 2.5}))]).token_ids == [1]
    with pytest.raises(ValueError, match="logit_bias"):
        SamplingParams(logit_bias={1: 101.0})


def test_penalties_change_the_greedy_choice() -> None:
    logits = torch.tensor([[3.0, 2.9, 0.0, -5.0]])
    assert Sampler()(logits, [row(SamplingParams(temperature=0.0), output=[0])]).token_ids == [0]
    rep = row(SamplingParams(temperature=0.0, repetition_penalty=1.2), output=[0])
    assert Sampler()(logits, [rep]).token_ids == [1]  # 3 / 1.2 = 2.5 < 2.9
    prompt_only = row(SamplingParams(temperature=0.0, presence_penalty=2.0), prompt=[0])
    assert Sampler()(logits, [prompt_only]).token_ids == [0]  # presence looks at the output only


def test_suppressed_ids_are_never_sampled() -> None:
    logits = torch.tensor([[5.0, 4.0, 1.0, 0.0]])
    greedy = row(SamplingParams(temperature=0.0, min_tokens=2), suppress=(0,))
    assert Sampler()(logits, [greedy]).token_ids == [1]
    rows = [row(SamplingParams(temperature=2.0), seed=s, suppress=(0, 2)) for s in range(2000)]
    sampled = set(Sampler()(logits.expand(2000, 4), rows).token_ids)
    assert sampled == {1, 3}
    only = [row(SamplingParams(temperature=1.0, top_p=0.5), seed=1, suppress=(0, 1, 3))]
    assert Sampler()(logits, only).token_ids == [2]  # all but one filtered


# --------------------------------------------------------------------------------- filters and draws

FILTERS = [
    SamplingParams(temperature=1.0),
    SamplingParams(temperature=0.6),
    SamplingParams(temperature=1.3, top_k=5),
    SamplingParams(temperature=0.9, top_p=0.8),
    SamplingParams(temperature=1.0, top_p=0.3),
    SamplingParams(temperature=0.8, min_p=0.05),
    SamplingParams(temperature=1.0, top_k=20, top_p=0.9),
    SamplingParams(temperature=1.1, top_k=10, min_p=0.2),
    SamplingParams(temperature=1.0, top_k=30, top_p=0.7, min_p=0.02),
    SamplingParams(temperature=0.7, top_p=0.95, min_p=0.01),
]


@pytest.mark.parametrize("vocab_size,scale", [(64, 2.0), (3000, 4.0), (4096, 0.3)])
def test_tokens_match_reference_for_known_uniforms(vocab_size: int, scale: float) -> None:
    """Every row has its own seed, so its uniform is known: the token must be the reference draw.
    vocab 3000/4096 > NUM_NUCLEUS_CANDIDATES; scale 0.3 is nearly flat (nucleus found by sorting)."""
    assert vocab_size <= 64 or vocab_size > NUM_NUCLEUS_CANDIDATES
    gen = torch.Generator().manual_seed(vocab_size)
    num_rows = 20 * len(FILTERS)
    logits = torch.randn(num_rows, vocab_size, generator=gen) * scale
    params = [FILTERS[i % len(FILTERS)] for i in range(num_rows)]
    rows = [row(p, seed=1000 + i) for i, p in enumerate(params)]
    got = Sampler()(logits, rows).token_ids
    want = ref_draws(ref_weights(logits, params), [uniform_of(1000 + i) for i in range(num_rows)])
    assert got == want


def test_large_vocabulary_filters_match_reference() -> None:
    """Blockwise candidates (vocab 70000), with and without ties at the k-th token."""
    vocab, gen = 70000, torch.Generator().manual_seed(14)
    logits = torch.randn(16, vocab, generator=gen) * 3
    logits[8:] = (logits[8:] * 2).round() / 2  # ties everywhere
    params = [SamplingParams(top_k=20), SamplingParams(top_k=50, top_p=0.8, temperature=0.7),
              SamplingParams(top_p=0.6), SamplingParams(top_k=5, min_p=0.3)] * 4
    rows = [row(p, seed=90 + i) for i, p in enumerate(params)]
    got = Sampler()(logits, rows).token_ids
    assert got == ref_draws(ref_weights(logits, params), [uniform_of(90 + i) for i in range(len(rows))])


def wide_logits(kind: str, vocab_size: int, gen: torch.Generator) -> torch.Tensor:
    logits = torch.randn(vocab_size, generator=gen)
    if kind == "ties":
        return (logits * 2).round() / 2
    if kind == "head":  # a few heavy tokens over a flat tail
        logits[:4] += torch.tensor([6.0, 5.5, 5.0, 4.0])
    if kind == "mid":  # a nucleus of a few hundred tokens
        logits[:400] += 6.0 + torch.randn(400, generator=gen)
    return logits


@pytest.mark.parametrize("kind", ["flat", "ties", "head", "mid"])
def test_wide_nucleus_matches_reference(kind: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Nuclei far wider than the candidates, in a vocabulary large enough for the banded search."""
    sorted_rows: list[int] = []

    def counting_sort(e: torch.Tensor, top_p: torch.Tensor, total: torch.Tensor) -> None:
        sorted_rows.append(e.shape[0])
        keep_top_p_by_sort(e, top_p, total)

    monkeypatch.setattr(processors, "keep_top_p_by_sort", counting_sort)
    vocab, gen = 40000, torch.Generator().manual_seed(12)
    logits = torch.stack([wide_logits(kind, vocab, gen) for _ in range(4)])
    params = [SamplingParams(top_p=p) for p in (0.5, 0.9, 0.95, 0.99)]
    rows = [row(p, seed=70 + i) for i, p in enumerate(params)]
    got = Sampler()(logits, rows).token_ids
    assert got == ref_draws(ref_weights(logits, params), [uniform_of(70 + i) for i in range(len(rows))])
    assert len(sorted_rows) < len(rows)  # the band found most cutoffs without sorting the row


def test_banded_top_p_equals_sorting() -> None:
    gen = torch.Generator().manual_seed(13)
    for kind in ("flat", "ties", "head"):
        for top_p in (0.3, 0.95):
            logits = wide_logits(kind, 40000, gen) * 1.5
            e = (logits - logits.max()).exp()
            head = e.topk(NUM_NUCLEUS_CANDIDATES).values
            total = row_mass(e[None])
            banded, by_sort = e.clone(), e.clone()
            keep_top_p_wide(banded, top_p, float(total), float(head.sum()), float(head[-1]))
            keep_top_p_by_sort(by_sort[None], torch.tensor([top_p], dtype=torch.float64), total)
            assert torch.equal(banded, by_sort), (kind, top_p)


@pytest.mark.parametrize("params", FILTERS[2:], ids=str)
def test_sampled_support_is_the_reference_kept_set(params: SamplingParams) -> None:
    logits = torch.tensor([3.0, 2.6, 2.5, 2.0, 1.7, 1.5, 1.0, 0.8, 0.2, -0.5, -1.0, -3.0]) * 1.2
    kept = set(ref_weights(logits[None], [params])[0].nonzero().flatten().tolist())
    n = 4000
    out = Sampler(torch.Generator().manual_seed(3))(logits.expand(n, -1), [row(params)] * n)
    assert set(out.token_ids) == kept


@pytest.mark.parametrize("top_p", [0.1, 0.5, 0.8, 0.9, 0.95, 0.99])
def test_top_p_rule_equals_vllm(top_p: float) -> None:
    gen = torch.Generator().manual_seed(int(top_p * 100))
    for _ in range(20):
        logits = torch.randn(200, generator=gen) * 2
        ours = set(ref_weights(logits[None], [SamplingParams(top_p=top_p)])[0].nonzero().flatten().tolist())
        assert ours == vllm_top_p_keep(logits, top_p)


def chi_square(counts: torch.Tensor, probs: torch.Tensor) -> float:
    expected = probs * counts.sum()
    mask = expected > 0
    assert counts[~mask].sum() == 0
    return float(((counts[mask] - expected[mask]) ** 2 / expected[mask]).sum())


@pytest.mark.parametrize("params", [SamplingParams(temperature=0.7),
                                    SamplingParams(temperature=1.5, min_p=0.1),
                                    SamplingParams(temperature=1.0, top_k=5, top_p=0.8)], ids=str)
def test_empirical_distribution_matches_softmax(params: SamplingParams) -> None:
    logits = torch.tensor([1.0, 0.5, 2.0, -1.0, 0.0, 1.5, -0.3, 0.9])
    weights = ref_weights(logits[None], [params])[0]
    if params.top_k is None and params.min_p == 0:
        assert torch.allclose(weights / weights.sum(), (logits.double() / params.temperature).softmax(-1))
    n = 20000
    out = Sampler(torch.Generator().manual_seed(7))(logits.expand(n, -1), [row(params)] * n)
    counts = torch.bincount(torch.tensor(out.token_ids), minlength=8).double()
    dof = int((weights > 0).sum()) - 1
    assert chi_square(counts, weights / weights.sum()) < {7: 24.3, 4: 18.5, 3: 16.3, 2: 13.8}[dof]


# ------------------------------------------------------------------------------ ties and edge cases


def test_top_k_keeps_every_token_tied_with_the_kth() -> None:
    logits = torch.tensor([2.0, 2.0, 2.0, 1.0, 0.0])
    out = Sampler(torch.Generator().manual_seed(0))(logits.expand(3000, -1),
                                                    [row(SamplingParams(top_k=2))] * 3000)
    assert set(out.token_ids) == {0, 1, 2}


def test_top_k_ties_beyond_the_candidates() -> None:
    vocab = 3000
    logits = torch.zeros(vocab)
    logits[:10] = torch.arange(10, 0, -1).float()  # 10 distinct, then 2990 tied at 0
    params = SamplingParams(temperature=2.0, top_k=15)
    rows = [row(params, seed=s) for s in range(300)]
    got = Sampler()(logits.expand(300, -1), rows).token_ids
    weights = ref_weights(logits[None], [params])
    assert int((weights > 0).sum()) == vocab  # the k-th is tied with all the zeros
    assert got == ref_draws(weights.expand(300, -1), [uniform_of(s) for s in range(300)])
    assert max(got) >= 15


def test_top_p_ties_are_ordered_by_id() -> None:
    logits = torch.zeros(4)
    out = Sampler(torch.Generator().manual_seed(0))(logits.expand(2000, -1),
                                                    [row(SamplingParams(top_p=0.5))] * 2000)
    assert set(out.token_ids) == {0, 1}
    big = torch.zeros(5000)  # flat and wider than the candidates: the sorting path
    rows = [row(SamplingParams(top_p=0.3), seed=s) for s in range(50)]
    got = Sampler()(big.expand(50, -1), rows).token_ids
    want = ref_draws(ref_weights(big.expand(50, -1), [r.params for r in rows]), [uniform_of(s) for s in range(50)])
    assert max(got) < 1500 and got == want


def test_neutral_filters_change_nothing() -> None:
    logits = torch.randn(40, 50, generator=torch.Generator().manual_seed(5))
    base = Sampler()(logits, [row(SamplingParams(temperature=0.9), seed=s) for s in range(40)]).token_ids
    for params in (SamplingParams(temperature=0.9, top_p=1.0), SamplingParams(temperature=0.9, top_k=50),
                   SamplingParams(temperature=0.9, top_k=1000), SamplingParams(temperature=0.9, min_p=0.0)):
        got = Sampler()(logits, [row(params, seed=s) for s in range(40)]).token_ids
        assert got == base, params


def test_filters_that_leave_one_token_give_the_argmax() -> None:
    logits = torch.randn(30, 100, generator=torch.Generator().manual_seed(6))
    for params in (SamplingParams(min_p=1.0), SamplingParams(top_p=1e-6),
                   SamplingParams(temperature=5.0, top_k=1), SamplingParams(temperature=1e-6),
                   SamplingParams(top_k=3, top_p=1e-3)):
        got = Sampler()(logits, [row(params, seed=s) for s in range(30)]).token_ids
        assert got == logits.argmax(1).tolist(), params


# ------------------------------------------------------------------------------------------ seeding


def test_seeded_rows_ignore_batch_composition_and_position() -> None:
    vocab, steps = 500, 4
    gen = torch.Generator().manual_seed(11)
    step_logits = [torch.randn(1, vocab, generator=gen) * 2 for _ in range(steps)]
    seeded = SamplingParams(temperature=0.8, top_p=0.9, seed=42)
    others = [SamplingParams(temperature=0.0), SamplingParams(top_k=7), SamplingParams(min_p=0.1),
              SamplingParams(top_p=0.5, repetition_penalty=1.3), SamplingParams(temperature=1.2)]

    def run(position: int, num_others: int, global_seed: int) -> list[int]:
        torch.manual_seed(global_seed)  # the global RNG must not matter
        sampler, target_gen = Sampler(), torch.Generator().manual_seed(42)
        tokens: list[int] = []
        for logits in step_logits:
            batch = [SamplingRow(others[i % len(others)], [1, 2], [], None) for i in range(num_others)]
            batch.insert(position, SamplingRow(seeded, [1, 2], list(tokens), target_gen))
            noise = torch.randn(num_others + 1, vocab, generator=gen)
            noise[position] = logits[0]
            tokens.append(sampler(noise, batch).token_ids[position])
        return tokens

    alone = run(0, 0, 0)
    assert run(3, 5, 1) == alone
    assert run(5, 9, 2) == alone
    assert run(0, 2, 3) == alone


# ----------------------------------------------------------------------------------------- logprobs


def test_logprobs_are_raw_log_softmax_with_ranks() -> None:
    logits = torch.randn(6, 80, generator=torch.Generator().manual_seed(8)) * 3
    params = [SamplingParams(temperature=0.5, logprobs=5, repetition_penalty=1.5),
              SamplingParams(temperature=0.0, logprobs=0),
              SamplingParams(temperature=1.0),
              SamplingParams(temperature=1.0, top_k=3, logprobs=20),
              SamplingParams(temperature=2.0, logprobs=2, presence_penalty=2.0),
              SamplingParams(temperature=0.0, logprobs=1)]
    rows = [row(p, prompt=[1, 2, 3], output=[4], seed=i) for i, p in enumerate(params)]
    out = Sampler()(logits, rows)
    ref = torch.log_softmax(logits, dim=-1)
    for i, p in enumerate(params):
        entry = out.logprobs[i]
        if p.logprobs is None:
            assert entry is None
            continue
        assert entry is not None
        token = out.token_ids[i]
        top = ref[i].topk(p.logprobs).indices.tolist()
        assert list(entry) == [token] + [t for t in top if t != token]
        for t, lp in entry.items():
            assert lp.logprob == pytest.approx(ref[i, t].item(), abs=1e-5)
            assert lp.rank == 1 + int((logits[i] > logits[i, t]).sum())
        for rank, t in enumerate(top, 1):
            assert entry[t].rank == rank


def test_logprob_rank_of_ties_is_shared() -> None:
    logits = torch.tensor([[1.0, 3.0, 3.0, 0.0]])
    out = Sampler()(logits, [row(SamplingParams(temperature=0.0, logprobs=3))])
    entry = out.logprobs[0]
    assert entry is not None and out.token_ids == [1]
    assert {t: lp.rank for t, lp in entry.items()} == {1: 1, 2: 1, 0: 3}


def test_prompt_logprobs_match_log_softmax() -> None:
    n, vocab = 70, 90  # more rows than one chunk
    logits = torch.randn(n, vocab, generator=torch.Generator().manual_seed(9))
    next_ids = torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(10)).tolist()
    ref = torch.log_softmax(logits, dim=-1)
    result = prompt_logprobs(logits, next_ids, 3)
    assert len(result) == n
    for i, entry in enumerate(result):
        token = next_ids[i]
        assert next(iter(entry)) == token
        assert entry[token].logprob == pytest.approx(ref[i, token].item(), abs=1e-5)
        assert entry[token].rank == 1 + int((logits[i] > logits[i, token]).sum())
        top = ref[i].topk(3).indices.tolist()
        assert set(entry) == {token, *top}
        assert [entry[t].rank for t in top] == [1, 2, 3]
        assert math.isclose(sum(math.exp(lp.logprob) for lp in entry.values()),
                            sum(ref[i, t].exp().item() for t in entry), rel_tol=1e-5)
    assert prompt_logprobs(logits[:2], next_ids[:2], 0)[1] == {next_ids[1]: result[1][next_ids[1]]}
    with pytest.raises(ValueError):
        prompt_logprobs(logits, next_ids[:-1], 1)
