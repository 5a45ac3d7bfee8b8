"""The server through the official `openai` client (sync and async), checked against the offline engine."""

from __future__ import annotations

import asyncio
import math

import httpx
import openai
import pytest

from mixserve.llm import LLM
from mixserve.sampling_params import SamplingParams
from tests.server.conftest import MAX_MODEL_LEN, MODEL_NAME, Server

PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a small village,",
           "1, 2, 3, 4,"]
CHAT = [{"role": "user", "content": "Name three colours."}]


@pytest.fixture(scope="module")
def client(server: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def offline(smollm2_path: str) -> LLM:
    """The same model and weight format as the server, run in-process: the reference.

    Dense fp32 weights on both sides: with int8 decode weights, a prompt computed in a short chunk (after a
    prefix-cache hit) takes the int8 path and a long one the dense path, so greedy ties can differ.
    """
    return LLM(smollm2_path, kv_cache_bytes=1 << 28, max_model_len=MAX_MODEL_LEN, num_threads=2,
               weight_format="dense")


def offline_text(llm: LLM, prompt: str, max_tokens: int) -> str:
    out = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=max_tokens))
    return out[0].outputs[0].text


def test_models_and_health(server: Server, client: openai.OpenAI) -> None:
    assert httpx.get(f"{server.url}/health").json() == {"status": "ok"}
    models = client.models.list().data
    assert [m.id for m in models] == [MODEL_NAME]
    assert models[0].model_extra["max_model_len"] == MAX_MODEL_LEN


def test_greedy_completion_matches_offline_engine(client: openai.OpenAI, offline: LLM) -> None:
    for prompt in PROMPTS[:2]:
        resp = client.completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=12, temperature=0)
        assert resp.choices[0].text == offline_text(offline, prompt, 12)
        assert resp.choices[0].finish_reason == "length"
        assert resp.usage.prompt_tokens == len(offline.encode(prompt))
        assert resp.usage.completion_tokens == 12


def test_prompt_list_and_token_ids(client: openai.OpenAI, offline: LLM) -> None:
    ids = offline.encode(PROMPTS[1])
    resp = client.completions.create(model=MODEL_NAME, prompt=[PROMPTS[0], PROMPTS[1]], max_tokens=6,
                                     temperature=0)
    by_tokens = client.completions.create(model=MODEL_NAME, prompt=ids, max_tokens=6, temperature=0)
    assert [c.index for c in resp.choices] == [0, 1]
    assert resp.choices[1].text == by_tokens.choices[0].text == offline_text(offline, PROMPTS[1], 6)
    assert resp.usage.prompt_tokens == len(offline.encode(PROMPTS[0])) + len(ids)


def test_chat_stream_equals_non_stream(client: openai.OpenAI) -> None:
    full = client.chat.completions.create(model=MODEL_NAME, messages=CHAT, max_tokens=16, temperature=0)
    chunks = list(client.chat.completions.create(model=MODEL_NAME, messages=CHAT, max_tokens=16, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content and text
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == full.choices[0].finish_reason and all(f is None for f in finishes[:-1])
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == full.usage.completion_tokens
    assert chunks[-1].usage.prompt_tokens == full.usage.prompt_tokens


def test_n_samples_interleave_prefill_once_and_count_prompt_once(server: Server, client: openai.OpenAI) -> None:
    before = server.metrics()
    stream = client.chat.completions.create(model=MODEL_NAME, messages=CHAT, max_tokens=10, temperature=1.0,
                                            seed=7, n=3, stream=True, stream_options={"include_usage": True})
    texts, finish, order = {0: "", 1: "", 2: ""}, {}, []
    usage = None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            order.append(choice.index)
            texts[choice.index] += choice.delta.content or ""
            if choice.finish_reason is not None:
                finish[choice.index] = choice.finish_reason
    after = server.metrics()
    assert set(finish) == {0, 1, 2}
    assert len(set(texts.values())) > 1, "seeded samples should differ"
    assert order.index(1) < max(i for i, x in enumerate(order) if x == 0), "choices interleave"
    assert usage is not None and 3 <= usage.completion_tokens <= 30
    prompt_len = usage.prompt_tokens
    # the prompt is counted once and prefilled once, not three times
    assert after["mixserve:prompt_tokens_total"] - before["mixserve:prompt_tokens_total"] == prompt_len
    same = client.chat.completions.create(model=MODEL_NAME, messages=CHAT, max_tokens=10, temperature=1.0,
                                          seed=7, n=3)
    assert {c.index: c.message.content for c in same.choices} == texts
    assert same.usage.prompt_tokens == prompt_len
    assert same.usage.completion_tokens == usage.completion_tokens


def test_seed_reproducibility(client: openai.OpenAI) -> None:
    def sample(seed: int) -> str:
        r = client.completions.create(model=MODEL_NAME, prompt=PROMPTS[2], max_tokens=12, temperature=1.0,
                                      top_p=0.95, seed=seed)
        return r.choices[0].text

    assert sample(3) == sample(3)
    assert len({sample(s) for s in (1, 2, 3, 4)}) > 1


def test_stop_string_is_cut(client: openai.OpenAI, offline: LLM) -> None:
    base = offline_text(offline, PROMPTS[3], 12)
    stop = base.strip().split()[1]  # a word the greedy continuation will produce
    resp = client.completions.create(model=MODEL_NAME, prompt=PROMPTS[3], max_tokens=12, temperature=0, stop=[stop])
    choice = resp.choices[0]
    assert choice.finish_reason == "stop"
    assert choice.model_extra["stop_reason"] == stop
    assert stop not in choice.text and base.startswith(choice.text)


def test_chat_logprobs(client: openai.OpenAI) -> None:
    resp = client.chat.completions.create(model=MODEL_NAME, messages=CHAT, max_tokens=5, temperature=0,
                                          logprobs=True, top_logprobs=3)
    content = resp.choices[0].logprobs.content
    assert len(content) == resp.usage.completion_tokens
    assert "".join(c.token for c in content) == resp.choices[0].message.content
    for entry in content:
        assert len(entry.top_logprobs) == 3
        assert entry.top_logprobs[0].token == entry.token  # greedy picks the most likely token
        assert math.isclose(entry.top_logprobs[0].logprob, entry.logprob)
        assert entry.bytes == list(entry.token.encode())
        assert entry.logprob <= 0


def test_echo_logprobs_score_the_prompt_consistently(client: openai.OpenAI) -> None:
    """Scoring prompt+continuation with echo gives the logprobs the generation reported (prefill vs decode)."""
    gen = client.completions.create(model=MODEL_NAME, prompt=PROMPTS[0], max_tokens=6, temperature=0, logprobs=2)
    lp = gen.choices[0].logprobs
    assert len(lp.tokens) == 6 and len(lp.top_logprobs[0]) >= 2
    scored = client.completions.create(model=MODEL_NAME, prompt=PROMPTS[0] + gen.choices[0].text, max_tokens=0,
                                       echo=True, logprobs=1)
    s = scored.choices[0]
    assert s.text == PROMPTS[0] + gen.choices[0].text
    assert s.logprobs.token_logprobs[0] is None and scored.usage.completion_tokens == 0
    assert s.logprobs.text_offset[0] == 0
    tail = s.logprobs.token_logprobs[-6:]
    assert s.logprobs.tokens[-6:] == lp.tokens
    for a, b in zip(tail, lp.token_logprobs):
        assert abs(a - b) < 2e-3


def test_cached_tokens_reported(client: openai.OpenAI) -> None:
    long_prompt = "Here is a long shared system context. " * 12
    client.completions.create(model=MODEL_NAME, prompt=long_prompt + "First", max_tokens=1)
    again = client.completions.create(model=MODEL_NAME, prompt=long_prompt + "Second", max_tokens=1)
    assert again.usage.prompt_tokens_details.cached_tokens >= 16


def test_async_client_concurrent_requests_match_sequential(server: Server, offline: LLM) -> None:
    async def main() -> list[str]:
        aclient = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0, timeout=120)
        resps = await asyncio.gather(*(aclient.completions.create(model=MODEL_NAME, prompt=p, max_tokens=8,
                                                                  temperature=0) for p in PROMPTS))
        stream = await aclient.completions.create(model=MODEL_NAME, prompt=PROMPTS[0], max_tokens=8,
                                                  temperature=0, stream=True)
        streamed = "".join([c.choices[0].text async for c in stream if c.choices])
        await aclient.close()
        return [r.choices[0].text for r in resps] + [streamed]

    texts = asyncio.run(main())
    expected = [offline_text(offline, p, 8) for p in PROMPTS]
    assert texts[:-1] == expected
    assert texts[-1] == expected[0]


def test_tokenize_detokenize_round_trip(server: Server, offline: LLM) -> None:
    text = "Hello there, tokenizer!"
    tok = httpx.post(f"{server.url}/tokenize", json={"prompt": text}).json()
    assert tok["tokens"] == offline.encode(text) and tok["count"] == len(tok["tokens"])
    assert httpx.post(f"{server.url}/detokenize", json={"tokens": tok["tokens"]}).json()["prompt"] == text
    chat = httpx.post(f"{server.url}/tokenize", json={"messages": CHAT}).json()
    assert chat["tokens"] == offline.tokenizer.encode(offline.chat_prompt(CHAT), add_special_tokens=False)


def test_logit_bias_forces_and_bans_tokens(client: openai.OpenAI, offline: LLM) -> None:
    forced = offline.encode(" banana")[0]
    resp = client.completions.create(model=MODEL_NAME, prompt=PROMPTS[0], max_tokens=3, temperature=0,
                                     logit_bias={str(forced): 100})
    assert resp.choices[0].text == offline.tokenizer.decode([forced] * 3)
    greedy = offline.encode(offline_text(offline, PROMPTS[0], 1))[0]
    banned = client.completions.create(model=MODEL_NAME, prompt=PROMPTS[0], max_tokens=1, temperature=0,
                                       logit_bias={str(greedy): -100})
    assert banned.choices[0].text != offline_text(offline, PROMPTS[0], 1)
