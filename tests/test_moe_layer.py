"""The shared MoE layer vs a naive per-token loop, provider calls, routing traces, and errors."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from mixserve.experts import (
    ExpertKey,
    ExpertProj,
    ExpertWeights,
    InMemoryExpertProvider,
    RoutingTrace,
    borrow_experts,
)
from mixserve.layers.moe import MoE
from mixserve.models.base import WeightError

HIDDEN, INTER, SHARED, NUM_EXPERTS, TOP_K, LAYER = 32, 24, 40, 6, 2, 3


def make(seed: int = 0, *, scoring: str = "softmax", normalize_topk: bool = True,
         weights_in_activation_dtype: bool = False, shared: bool = False,
         shared_gate: bool = False) -> tuple[MoE, InMemoryExpertProvider]:
    torch.manual_seed(seed)
    moe = MoE(LAYER, HIDDEN, INTER, NUM_EXPERTS, TOP_K, scoring=scoring,  # type: ignore[arg-type]
              normalize_topk=normalize_topk, weights_in_activation_dtype=weights_in_activation_dtype,
              shared_intermediate_size=SHARED if shared else None, shared_expert_gate=shared_gate)
    for p in moe.parameters():
        p.data.normal_(0, 0.3)
    provider = InMemoryExpertProvider([LAYER], NUM_EXPERTS, HIDDEN, INTER)
    for p in provider.parameters():
        p.data.normal_(0, 0.3)
    return moe, provider


def naive(moe: MoE, provider: InMemoryExpertProvider, x: torch.Tensor) -> torch.Tensor:
    """Token by token, expert by expert, in float64."""
    gate_up, down = (t.double() for t in provider.stacks(LAYER))
    router = moe.gate.weight.double()
    out = torch.zeros(x.shape, dtype=torch.float64)
    for t, xt in enumerate(x.double()):
        logits = router @ xt
        scores = logits.softmax(-1) if moe.scoring == "softmax" else logits.sigmoid()
        weights, ids = scores.topk(TOP_K)
        if moe.normalize_topk:
            weights = weights / weights.sum()
        for w, e in zip(weights, ids):
            h = gate_up[e] @ xt
            out[t] += w * (down[e] @ (F.silu(h[:INTER]) * h[INTER:]))
        if moe.shared_expert is not None:
            gu = moe.shared_expert.gate_up_proj.weight.double() @ xt
            shared = moe.shared_expert.down_proj.weight.double() @ (F.silu(gu[:SHARED]) * gu[SHARED:])
            if moe.shared_expert_gate is not None:
                shared = torch.sigmoid(moe.shared_expert_gate.weight.double() @ xt) * shared
            out[t] += shared
    return out


class CountingProvider:
    """Wraps a provider and records every get/release."""

    def __init__(self, inner: InMemoryExpertProvider) -> None:
        self.inner = inner
        self.gets: list[tuple[int, list[int]]] = []
        self.releases: list[ExpertWeights] = []

    def plan(self, layer_idx: int, x: torch.Tensor, topk_ids: torch.Tensor,
             active_ids: list[int]) -> list[list[int]]:
        return self.inner.plan(layer_idx, x, topk_ids, active_ids)

    def get(self, layer_idx: int, expert_ids: list[int]) -> ExpertWeights:
        self.gets.append((layer_idx, list(expert_ids)))
        return self.inner.get(layer_idx, expert_ids)

    def release(self, weights: ExpertWeights) -> None:
        self.releases.append(weights)


FLAGS = list(itertools.product(["softmax", "sigmoid"], [True, False], [True, False],
                               [(False, False), (True, False), (True, True)]))


@pytest.mark.parametrize("scoring,normalize,act_dtype,shared", FLAGS)
def test_matches_naive_loop(scoring: str, normalize: bool, act_dtype: bool,
                            shared: tuple[bool, bool]) -> None:
    moe, provider = make(scoring=scoring, normalize_topk=normalize, weights_in_activation_dtype=act_dtype,
                         shared=shared[0], shared_gate=shared[1])
    for num_tokens in (1, 3, 37):
        x = torch.randn(num_tokens, HIDDEN)
        out = moe(x, provider)
        assert out.shape == x.shape and out.dtype == x.dtype
        torch.testing.assert_close(out.double(), naive(moe, provider, x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("act_dtype", [True, False])
def test_bfloat16_close_to_float32(act_dtype: bool) -> None:
    moe, provider = make(weights_in_activation_dtype=act_dtype, shared=True, shared_gate=True)
    x = torch.randn(20, HIDDEN)
    ref = moe(x, provider)
    moe.to(torch.bfloat16)
    provider.to(torch.bfloat16)
    out = moe(x.bfloat16(), provider)
    assert out.dtype == torch.bfloat16
    cos = F.cosine_similarity(out.float(), ref, dim=-1)
    assert cos.min() > 0.97, cos


def test_each_active_expert_runs_once(monkeypatch: pytest.MonkeyPatch) -> None:
    moe, provider = make()
    counting = CountingProvider(provider)
    calls: list[int] = []
    linear = F.linear

    def counting_linear(*args: Any, **kwargs: Any) -> torch.Tensor:
        calls.append(1)
        return linear(*args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "linear", counting_linear)
    for num_tokens in (1, 50):
        calls.clear()
        x = torch.randn(num_tokens, HIDDEN)
        ids = torch.softmax(x @ moe.gate.weight.T, -1).topk(TOP_K).indices
        active = sorted(set(ids.flatten().tolist()))
        moe(x, counting)
        assert counting.gets[-1] == (LAYER, active)
        assert len(calls) == 1 + 2 * len(active)  # router, then gate_up + down per active expert
    assert len(counting.gets) == len(counting.releases) == 2
    assert len(counting.gets[-1][1]) == NUM_EXPERTS  # 50 tokens hit every expert, each run once


def test_trace_records_topk() -> None:
    moe, provider = make(normalize_topk=False)
    trace = RoutingTrace()
    x = torch.randn(9, HIDDEN)
    trace.begin_step(torch.arange(9), [4, 5])
    moe(x, provider, trace)
    probs = torch.softmax(x @ moe.gate.weight.T, -1)
    weights, ids = probs.topk(TOP_K)
    step = trace.steps[0]
    assert trace.layer_ids() == [LAYER] and step.query_lens == [4, 5]
    assert torch.equal(step.topk_ids[LAYER], ids)
    torch.testing.assert_close(step.topk_weights[LAYER], weights)
    assert trace.expert_counts(LAYER, NUM_EXPERTS).sum() == 9 * TOP_K


@pytest.mark.parametrize("suffix", [".npz", ".json"])
def test_trace_save_load_roundtrip(tmp_path: Path, suffix: str) -> None:
    moe, provider = make()
    trace = RoutingTrace()
    for n in (5, 1, 1):
        trace.begin_step(torch.arange(n), [n])
        moe(torch.randn(n, HIDDEN), provider, trace)
    trace.save(tmp_path / f"trace{suffix}")
    loaded = RoutingTrace.load(tmp_path / f"trace{suffix}")
    assert loaded.to_dict() == trace.to_dict()
    assert RoutingTrace.from_dict(trace.to_dict()).to_dict() == trace.to_dict()


def test_trace_needs_a_step() -> None:
    moe, provider = make()
    with pytest.raises(RuntimeError, match="begin_step"):
        moe(torch.randn(2, HIDDEN), provider, RoutingTrace())


def test_in_memory_provider_is_zero_copy_and_loads() -> None:
    _, provider = make()
    gate_up, down = provider.stacks(LAYER)
    w = provider.get(LAYER, [4, 1])
    assert w.gate_up[0].data_ptr() == gate_up[4].data_ptr() and w.down[1].data_ptr() == down[1].data_ptr()
    g, u, d = torch.randn(INTER, HIDDEN), torch.randn(INTER, HIDDEN), torch.randn(HIDDEN, INTER)
    fresh = InMemoryExpertProvider([LAYER], NUM_EXPERTS, HIDDEN, INTER)
    fresh.load(ExpertKey(LAYER, 2, ExpertProj.GATE), g, "g")
    fresh.load(ExpertKey(LAYER, 2, ExpertProj.UP), u, "u")
    fresh.load(ExpertKey(LAYER, None, ExpertProj.DOWN), d.expand(NUM_EXPERTS, -1, -1), "d")
    assert torch.equal(fresh.get(LAYER, [2]).gate_up[0], torch.cat([g, u]))
    assert torch.equal(fresh.stacks(LAYER)[1][5], d)
    assert (LAYER, 2, ExpertProj.GATE) not in fresh.missing()
    assert (LAYER, 3, ExpertProj.GATE) in fresh.missing()
    assert all(p is not ExpertProj.DOWN for _, _, p in fresh.missing())
    with pytest.raises(WeightError, match="'bad.tensor'.*shape"):
        fresh.load(ExpertKey(LAYER, 0, ExpertProj.GATE), torch.zeros(INTER + 1, HIDDEN), "bad.tensor")
    with pytest.raises(WeightError, match="'x'.*not an MoE layer"):
        fresh.load(ExpertKey(LAYER + 1, 0, ExpertProj.GATE), g, "x")
    with pytest.raises(WeightError, match="'y'.*expert 9"):
        fresh.load(ExpertKey(LAYER, 9, ExpertProj.GATE), g, "y")
    with pytest.raises(WeightError, match="'again'.*already loaded"):
        fresh.load(ExpertKey(LAYER, None, ExpertProj.GATE_UP), torch.zeros(NUM_EXPERTS, 2 * INTER, HIDDEN),
                   "again")
    fresh.begin_loading()
    assert len(fresh.missing()) == 3 * NUM_EXPERTS
    with pytest.raises(IndexError, match="expert 6"):
        provider.get(LAYER, [6])


def test_borrow_releases_on_error() -> None:
    _, provider = make()
    counting = CountingProvider(provider)
    with pytest.raises(ZeroDivisionError), borrow_experts(counting, LAYER, [0]):
        _ = 1 / 0
    assert len(counting.releases) == 1


def test_bad_shapes_raise() -> None:
    moe, provider = make()
    with pytest.raises(ValueError, match=rf"expects \[num_tokens, {HIDDEN}\].*\[4, {HIDDEN + 1}\]"):
        moe(torch.randn(4, HIDDEN + 1), provider)
    with pytest.raises(ValueError, match="expects"):
        moe(torch.randn(1, 4, HIDDEN), provider)
    wrong = InMemoryExpertProvider([LAYER], NUM_EXPERTS, HIDDEN, INTER + 2)
    with pytest.raises(ValueError, match=rf"expert \d+: gate_up \[{2 * INTER + 4}, {HIDDEN}\]"):
        moe(torch.randn(3, HIDDEN), wrong)
    with pytest.raises(ValueError, match="top_k"):
        MoE(0, HIDDEN, INTER, 2, 3, normalize_topk=True, weights_in_activation_dtype=False)
    with pytest.raises(ValueError, match="scoring"):
        MoE(0, HIDDEN, INTER, 4, 2, scoring="relu", normalize_topk=True,  # type: ignore[arg-type]
            weights_in_activation_dtype=False)
    with pytest.raises(ValueError, match="shared"):
        MoE(0, HIDDEN, INTER, 4, 2, normalize_topk=True, weights_in_activation_dtype=False,
            shared_expert_gate=True)
