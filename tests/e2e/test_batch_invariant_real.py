"""Batch-invariant mode on the embedded SmolLM2 (GGUF: int4 layers, int8 LM head): a prompt's
greedy tokens and logprobs are bitwise the same alone, beside 15 other requests and after a prefix-cache
hit, and echo-scoring the generated text gives the generation's logprobs exactly (the default mode
measured 0.086 nats apart here)."""

from __future__ import annotations

from mixserve import LLM, SamplingParams

PROMPT = ("You are a helpful poet who writes in plain English for children. Write a short poem about the sea, "
          "the wind, the gulls over the harbour and the boats that come home at night.")
OTHERS = [f"Tell me fact number {i} about the history of Rome." for i in range(15)]


def _gen(out) -> tuple[list[int], list[float]]:  # type: ignore[no-untyped-def]
    o = out.outputs[0]
    return list(o.token_ids), [d[t].logprob for d, t in zip(o.logprobs, o.token_ids, strict=True)]


def test_smollm2_is_bitwise_batch_invariant(smollm2_path: str) -> None:
    llm = LLM(smollm2_path, batch_invariant=True, max_model_len=256)
    greedy = SamplingParams(max_tokens=16, temperature=0, logprobs=0, ignore_eos=True)
    others = SamplingParams(max_tokens=8, temperature=1.0, seed=3, ignore_eos=True)
    alone = _gen(llm.generate([PROMPT], greedy)[0])
    beside = _gen(llm.generate([PROMPT] + OTHERS, [greedy] + [others] * len(OTHERS))[0])
    hit = llm.generate([PROMPT], greedy)[0]
    assert hit.num_cached_tokens > 0
    assert alone == beside == _gen(hit)
    ids = llm.tokenizer.encode(PROMPT) + alone[0]
    scored = llm.generate([ids], SamplingParams(max_tokens=1, prompt_logprobs=0))[0].prompt_logprobs
    assert scored is not None
    n = len(ids) - len(alone[0])
    assert [d[t].logprob for d, t in zip(scored[n:], alone[0], strict=True)] == alone[1]
