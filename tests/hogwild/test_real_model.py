"""Hogwild on the real embedded model (SmolLM2-135M-Instruct): `LLM.hogwild`, the `hogwild` strategy
through `LLM.scale` with its compute accounting, the pool given back. Short runs."""

from __future__ import annotations

import pytest

from mixserve import LLM, SamplingParams

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def llm(smollm2_path: str) -> LLM:
    return LLM(smollm2_path, num_blocks=256, block_size=16, max_model_len=2048)


def test_llm_hogwild_two_workers(llm: LLM) -> None:
    r = llm.hogwild("What is 2 + 3?", workers=2, max_tokens=24, params=SamplingParams(temperature=0))
    pool = llm.engine.scheduler.pool
    assert pool.num_free_blocks == pool.num_blocks
    assert r.workers == 2 and r.num_passes <= 24
    assert {s.worker for s in r.steps} == {"Alice", "Bob"}
    assert "### Work in progress (others)" in r.transcript
    assert r.finished_by == "answer" or r.answer_text.startswith("\\boxed{")
    assert r.num_computed_tokens <= r.num_prefill_tokens + r.num_generated_tokens


def test_hogwild_strategy_through_scale(llm: LLM) -> None:
    res = llm.scale("What is 2 + 3?", strategy="hogwild", budget=2,
                    params=SamplingParams(temperature=0.7, max_tokens=16, seed=1))
    assert res.strategy == "hogwild" and res.info["workers"] == 2
    u = res.usage
    assert u.num_samples == 2 and u.policy_generated_tokens >= 2 * 16
    assert u.policy_prefill_tokens > 0 and u.computed_tokens > 0 and u.flops is not None
    pool = llm.engine.scheduler.pool
    assert pool.num_free_blocks == pool.num_blocks and not llm.engine.has_unfinished()
