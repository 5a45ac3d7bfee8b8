"""Synthetic routing: valid routes, Zipf skew, stickiness, affinity; trace replay."""

from __future__ import annotations

import pytest
import torch

from mixserve.experts.synthetic import SyntheticRouting, SyntheticRoutingConfig
from mixserve.experts.trace import TraceReplay


def test_routes_are_valid_and_skewed() -> None:
    cfg = SyntheticRoutingConfig((0, 1, 2), 16, 4, zipf_alpha=1.5, stickiness=0.0, affinity=0.0, seed=0)
    trace = SyntheticRouting(cfg).trace([50] * 20)
    for step in trace.steps:
        for ids in step.topk_ids.values():
            assert ids.shape == (50, 4) and all(len(set(row)) == 4 for row in ids.tolist())
            assert int(ids.min()) >= 0 and int(ids.max()) < 16
    counts = trace.expert_counts(0, 16).float()
    top = counts.sort(descending=True).values
    assert top[:4].sum() > 0.4 * counts.sum()  # uniform would give 0.25


def test_stickiness_and_affinity() -> None:
    sticky = SyntheticRouting(SyntheticRoutingConfig((0,), 32, 2, zipf_alpha=0.0, stickiness=1.0, seed=0))
    first = sticky.draw(0, 1)
    assert all(set(sticky.draw(0, 1).flatten()) == set(first.flatten()) for _ in range(5))
    affine = SyntheticRouting(SyntheticRoutingConfig((0, 1), 32, 2, zipf_alpha=0.0, stickiness=0.0,
                                                     affinity=1.0, seed=0))
    for _ in range(5):
        a, b = affine.draw(0, 3), affine.draw(1, 3)
        assert set(b.flatten()) == set(affine.affine[1][a].flatten())
    with pytest.raises(ValueError, match="stickiness"):
        SyntheticRoutingConfig((0,), 4, 2, stickiness=1.5)


def test_trace_replay() -> None:
    cfg = SyntheticRoutingConfig((0, 1), 8, 2, seed=0)
    trace = SyntheticRouting(cfg).trace([3, 1])
    replay = TraceReplay(trace)
    dummy_w = torch.zeros(3, 2)
    for step in trace.steps:
        n = step.topk_ids[0].shape[0]
        for layer_idx in (0, 1):
            ids, w = replay.route(layer_idx, torch.zeros(n, 2, dtype=torch.long), dummy_w[:n])
            assert torch.equal(ids, step.topk_ids[layer_idx])
    with pytest.raises(ValueError, match="layer 0 asked for step 2"):
        replay.route(0, torch.zeros(1, 2, dtype=torch.long), dummy_w[:1])
    with pytest.raises(ValueError, match=r"step 0 layer 0 recorded \[3, 2\]"):
        TraceReplay(trace).route(0, torch.zeros(2, 2, dtype=torch.long), dummy_w[:2])
