"""The quantized formats on the two embedded real models, against the dense run of the same weights.

`auto` on a GGUF file runs its Q4_* tensors as int4 (codes re-encoded exactly) and the rest as int8.
Measured: teacher-forced next-token argmax over TEXT agrees with the dense model at 97.9% of the 48
positions for SmolLM2 (all int4 but the Q8_0 LM head) and 89.8% of 49 for gemma-3-270m (mostly Q5_0,
so mostly int8 per channel), and the first 12 greedy tokens of PROMPT are identical on both; the
tests assert >= 85% and the first 4 greedy tokens.
"""

from __future__ import annotations

import pytest
import torch

from mixserve import LLM, SamplingParams
from mixserve.builder import load_model
from mixserve.config import EngineConfig, ModelConfig
from mixserve.layers.linear import quantize_linears
from tests.harness import greedy, prefill_logits

TEXT = ("The history of the printing press begins in the fifteenth century, when Johannes Gutenberg "
        "combined movable metal type, oil-based ink and a wooden press adapted from wine making. "
        "Books became cheaper, literacy spread, and ideas travelled faster than ever before.")
PROMPT = "The capital of France is"


@pytest.mark.parametrize("name", ["smollm2", "gemma3"])
def test_native_formats_follow_dense(name: str, request: pytest.FixtureRequest) -> None:
    path = request.getfixturevalue(f"{name}_path")
    loaded = load_model(EngineConfig(model=ModelConfig(model=path, weight_format="dense", max_model_len=512)))
    model, tokenizer = loaded.model, loaded.checkpoint.tokenizer
    text_ids, prompt_ids = tokenizer.encode(TEXT), tokenizer.encode(PROMPT)
    with torch.inference_mode():
        dense_logits = prefill_logits(model, text_ids)
        dense_greedy = greedy(model, prompt_ids, 12)
        counts = quantize_linears(model, "native")
        quant_logits = prefill_logits(model, text_ids)
        quant_greedy = greedy(model, prompt_ids, 12)
    assert counts["int4"] > 0 and counts["int8"] > 0  # both files mix 4-bit and wider tensors
    agree = (dense_logits.argmax(-1) == quant_logits.argmax(-1)).float().mean().item()
    print(f"{name}: {counts}, argmax agreement {agree:.3f}, greedy {quant_greedy == dense_greedy}")
    assert agree >= 0.85
    assert quant_greedy[:4] == dense_greedy[:4]


def test_two_loads_give_identical_tokens(smollm2_path: str) -> None:
    """No load-time measurement picks kernels: two loads of one model decode the same tokens."""
    params = SamplingParams(temperature=0.8, seed=7, max_tokens=12, ignore_eos=True)
    outs = []
    for _ in range(2):
        llm = LLM(smollm2_path, num_blocks=64, max_model_len=512)
        outs.append([llm.generate([PROMPT], params)[0].outputs[0].token_ids,
                     llm.generate([PROMPT], SamplingParams(temperature=0, max_tokens=12))[0].outputs[0].token_ids])
    assert outs[0] == outs[1]


ECHO_BOUND = 0.1
"""Nats: a token's logprob alone, beside 15 others, or echo-scored as a prompt. Every path runs the
same int4/int8 weights, so only the kernels' reduction order and bf16 rounding of activations differ
with the batch shape (measured on SmolLM2: at most 0.061 nats over 8 greedy tokens)."""


def test_same_weights_alone_beside_others_and_echoed(smollm2_path: str) -> None:
    """One model whatever the batch: a greedy request's tokens and logprobs alone, beside 15 other
    requests, and echo-scored as a prompt agree (the old int8/fp32 switch moved them ~0.6 nats)."""
    llm = LLM(smollm2_path, num_blocks=256, max_model_len=512, enable_prefix_caching=False)
    params = SamplingParams(temperature=0, max_tokens=8, logprobs=0, ignore_eos=True)
    others = [f"Item {i}: a short note about the number {i * 7}" for i in range(15)]
    alone = llm.generate([PROMPT], params)[0]
    crowd = llm.generate([PROMPT, *others], params)[0]
    a, c = alone.outputs[0], crowd.outputs[0]
    assert a.token_ids == c.token_ids and a.logprobs is not None and c.logprobs is not None
    lp_alone = [e[t].logprob for t, e in zip(a.token_ids, a.logprobs)]
    lp_crowd = [e[t].logprob for t, e in zip(c.token_ids, c.logprobs)]
    echo = llm.generate([alone.prompt_token_ids + a.token_ids],
                        SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=0))[0]
    assert echo.prompt_logprobs is not None
    n = len(alone.prompt_token_ids)
    lp_echo = [echo.prompt_logprobs[n + i][t].logprob for i, t in enumerate(a.token_ids)]
    worst = max(max(abs(x - y) for x, y in zip(lp_alone, lp_crowd)),
                max(abs(x - y) for x, y in zip(lp_alone, lp_echo)))
    print(f"max logprob difference alone/crowd/echo: {worst:.4f} nats")
    assert worst <= ECHO_BOUND
