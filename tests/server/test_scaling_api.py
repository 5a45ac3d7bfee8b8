"""Strategy requests through the OpenAI API: one prompt prefill shared by every sample, accounting in usage."""

from __future__ import annotations

import httpx
import openai

from tests.server.conftest import MODEL_NAME, Server

QUESTION = [{"role": "user", "content": "What is 12 + 30? Answer with the number."}]


def test_majority_vote_through_chat(server: Server) -> None:
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0, timeout=300)
    resp = client.chat.completions.create(model=MODEL_NAME, messages=QUESTION, max_tokens=24, temperature=0.8,
                                          seed=1, extra_body={"strategy": "majority", "budget": 4})
    body = resp.model_dump()
    scaling, usage = body["scaling"], body["usage"]
    assert scaling["strategy"] == "majority" and len(scaling["candidates"]) == 4
    assert resp.choices[0].message.content
    acc = usage["scaling"]
    assert acc["num_samples"] == 4 and acc["policy_generated_tokens"] == usage["completion_tokens"]
    # the prompt is prefilled once; the other samples reuse it (fork)
    assert acc["policy_reused_tokens"] >= 3 / 4 * acc["policy_prompt_tokens"] - 4
    assert usage["prompt_tokens_details"]["cached_tokens"] >= acc["policy_reused_tokens"]
    assert acc["flops"] > 0


def test_strategy_errors_name_the_field(server: Server) -> None:
    url = f"{server.url}/v1/chat/completions"
    for extra, param in (({"strategy": "telepathy"}, "strategy"), ({"strategy": "majority", "budget": 0}, "budget"),
                         ({"strategy": "bon", "budget": 2, "verifier": "astrology"}, "verifier"),
                         ({"strategy": "majority", "stream": True}, "strategy")):
        resp = httpx.post(url, json={"messages": QUESTION, "max_tokens": 4, **extra}, timeout=60)
        assert resp.status_code == 400, resp.text
        assert resp.json()["error"]["param"] == param, resp.text
