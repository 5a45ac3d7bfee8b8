"""Branching and scaling on the real embedded model (SmolLM2-135M-Instruct): few, short requests."""

from __future__ import annotations

import pytest

from mixserve import LLM, SamplingParams
from mixserve.scaling import ScaleConfig

GREEDY = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)


@pytest.fixture(scope="module")
def llm(smollm2_path: str) -> LLM:
    return LLM(smollm2_path, num_blocks=256, block_size=16, max_model_len=512, weight_format="dense")


def final(llm: LLM, request_id: str):
    """(all generated token ids, last delta) of a single-sample request."""
    tokens, last = [], None
    while llm.engine.has_unfinished():
        for delta in llm.engine.step():
            if delta.request_id == request_id:
                tokens += delta.outputs[0].token_ids if delta.outputs else []
                last = delta
    return tokens, last


def test_forked_continuation_equals_recomputed_continuation(llm: LLM) -> None:
    prompt = llm.encode("The three primary colours are")
    engine = llm.engine
    engine.add_request("p", prompt, GREEDY, pause_on_finish=True)
    first, _ = final(llm, "p")
    engine.fork_request("p", "c", GREEDY)
    engine.release_request("p")
    tokens, forked = final(llm, "c")
    recomputed = llm.generate(prompt + first, GREEDY)[0].outputs[0].token_ids
    assert tokens == recomputed
    assert forked.num_cached_tokens == len(prompt) + len(first) - 1
    assert forked.metrics.num_computed_prompt_tokens == 1
    pool = engine.scheduler.kv.pool
    assert pool.num_free_blocks == pool.num_blocks


def test_scale_with_judge_prefills_the_prompt_once_and_accounts_everything(llm: LLM) -> None:
    prompt = llm.chat_prompt([{"role": "user", "content": "What is 2 + 3? Answer with a number."}])
    config = ScaleConfig(params=SamplingParams(temperature=0.8, max_tokens=12, seed=0))
    result = llm.scale(prompt, strategy="bom", budget=4, verifier="judge", config=config)
    u = result.usage
    assert len(result.candidates) == 4 and all(c.score is not None for c in result.candidates)
    assert all(0.0 <= (c.score or 0) <= 1.0 for c in result.candidates)
    prompt_len = len(llm.encode(prompt))
    assert u.policy_prompt_tokens == 4 * prompt_len
    assert u.policy_prefill_tokens <= prompt_len + 3
    assert u.verifier_calls == 4 and u.verifier_generated_tokens == 4
    assert u.verifier_reused_tokens >= 4 * prompt_len  # judges fork from the candidates' KV
    assert u.flops is not None and u.flops > 2 * 134e6 * u.computed_tokens * 0.9
    pool = llm.engine.scheduler.kv.pool
    assert pool.num_free_blocks == pool.num_blocks and llm.engine.num_paused == 0
