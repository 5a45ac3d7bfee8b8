"""Exactness of attention over views: a query over a view of segments (keys at segment-local
positions, queries rotated per segment) gives the logits of a plain forward pass over the
concatenated view at the same positions, on tiny random models of every RoPE family, through the
fast path and the torch reference; appending a finished step recomputes no key; the pool refills."""

from __future__ import annotations

import pytest
import torch

from mixserve.hogwild.forward import forward_runs
from mixserve.hogwild.segments import HogwildError
from mixserve.hogwild.views import Run, ViewPart
from tests.harness import prefill_logits
from tests.hogwild.conftest import Rig

A = [5, 17, 99, 3, 250, 42, 42]          # 7 tokens: segments start off block boundaries (block 4)
B = [9, 190, 4, 77, 150]
C = [11, 60, 21, 240, 8, 13]
D = [31, 2, 200, 64]


def _close(ours: torch.Tensor, ref: torch.Tensor) -> None:
    torch.testing.assert_close(ours, ref, atol=2e-4, rtol=2e-4)


def _parts(*segments) -> tuple[ViewPart, ...]:  # type: ignore[no-untyped-def]
    return tuple(ViewPart(s, s.length) for s in segments)


@pytest.mark.parametrize("reference", [False, True], ids=["fast", "reference"])
def test_chained_segments_equal_plain_forward(family_model, reference: bool) -> None:  # type: ignore[no-untyped-def]
    """A, B, C prefilled as three segments in ONE pass (each seeing the ones before it), then D decoded
    token by token over the view [A, B, C, D]: every logit equals the plain forward of A+B+C+D."""
    _, model = family_model
    rig = Rig(model)
    sa, sb, sc, sd = (rig.segments.new(n) for n in "ABCD")
    runs = [Run((), sa, tuple(A)), Run((ViewPart(sa, len(A)),), sb, tuple(B)),
            Run((ViewPart(sa, len(A)), ViewPart(sb, len(B))), sc, tuple(C))]
    rows = [forward_runs(rig.vm, rig.segments, runs, reference=reference, all_logits=True)]
    for token in D:
        rows.append(forward_runs(rig.vm, rig.segments, [Run(_parts(sa, sb, sc), sd, (token,))],
                                 reference=reference))
    _close(torch.cat(rows), prefill_logits(model, A + B + C + D))
    assert rig.segments.num_written_tokens == len(A + B + C + D)
    rig.segments.release_all()
    assert rig.pool.num_free_blocks == rig.pool.num_blocks


def test_workers_share_segments_in_one_batch(family_model) -> None:  # type: ignore[no-untyped-def]
    """Three workers decode in one batch over views sharing the prompt segment P and a finished step
    Y (written in the same pass as P): worker 0 sees [P, X0], worker 1 [P, Y, X1], worker 2 [P, X2].
    Each row equals a plain forward over the tokens of its view."""
    _, model = family_model
    rig = Rig(model)
    prompt, done = rig.segments.new("P"), rig.segments.new("Y")
    forward_runs(rig.vm, rig.segments, [Run((), prompt, tuple(A + B)), Run((ViewPart(prompt, len(A + B)),),
                                                                          done, tuple(D))])
    own = [rig.segments.new(f"X{i}") for i in range(3)]
    streams = [C, D + C[:2], B[::-1] + [1]]
    for step in range(4):
        runs = [Run(_parts(prompt), own[0], (streams[0][step],)),
                Run(_parts(prompt, done), own[1], (streams[1][step],)),
                Run(_parts(prompt), own[2], (streams[2][step],))]
        logits = forward_runs(rig.vm, rig.segments, runs)
        views = [A + B + streams[0][:step + 1], A + B + D + streams[1][:step + 1], A + B + streams[2][:step + 1]]
        for row, view in zip(logits, views):
            _close(row, prefill_logits(model, view)[-1])
    rig.segments.release_all()
    assert rig.pool.num_free_blocks == rig.pool.num_blocks


def test_finished_step_joins_history_without_recomputing(family_model) -> None:  # type: ignore[no-untyped-def]
    """A worker writes a step over [P, S]; the step then becomes part of the common history of a new
    view [P, S, T] (the same blocks, no copy): T's logits equal the plain forward, and no token's
    K/V were computed twice (written tokens == distinct tokens)."""
    _, model = family_model
    rig = Rig(model)
    prompt, step, nxt = (rig.segments.new(n) for n in ("P", "S", "T"))
    forward_runs(rig.vm, rig.segments, [Run((), prompt, tuple(A))])
    for token in B:
        forward_runs(rig.vm, rig.segments, [Run(_parts(prompt), step, (token,))])
    blocks_before = list(step.block_ids)
    written = rig.segments.num_written_tokens
    logits = forward_runs(rig.vm, rig.segments, [Run(_parts(prompt, step), nxt, tuple(C))], all_logits=True)
    _close(logits, prefill_logits(model, A + B + C)[len(A + B):])
    assert step.block_ids == blocks_before
    assert rig.segments.num_written_tokens - written == len(C)  # only the new tokens were computed
    assert rig.segments.num_written_tokens == len(A + B + C)
    rig.segments.release_all()
    assert rig.pool.num_free_blocks == rig.pool.num_blocks


def test_pool_short_is_a_clear_error_and_pool_refills(family_model) -> None:  # type: ignore[no-untyped-def]
    _, model = family_model
    rig = Rig(model, num_blocks=3, block_size=4)
    seg = rig.segments.new("P")
    with pytest.raises(HogwildError, match="3 free blocks.*needs 4"):
        forward_runs(rig.vm, rig.segments, [Run((), seg, tuple(A + B + C[:2]))])
    rig.segments.release_all()
    assert rig.pool.num_free_blocks == rig.pool.num_blocks
