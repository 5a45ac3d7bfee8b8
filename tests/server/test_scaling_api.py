"""Strategy requests through the OpenAI API: one prompt prefill shared by every sample, accounting in usage."""

from __future__ import annotations

import json

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
                         ({"strategy": "majority", "extractor": "roman"}, "extractor"),
                         ({"strategy": "bon", "verifier": "task"}, "reference"),
                         ({"strategy": "majority", "stream": True, "budget": 2000}, "budget"),
                         ({"strategy": "majority", "budget": 300}, "budget")):
        resp = httpx.post(url, json={"messages": QUESTION, "max_tokens": 4, **extra}, timeout=60)
        assert resp.status_code == 400, resp.text
        assert resp.json()["error"]["param"] == param, resp.text
        if extra.get("budget") == 300:  # within the strategies' own range, above the server's cap
            assert "max_strategy_budget=256" in resp.json()["error"]["message"]


def test_streamed_strategy_progress_through_the_official_client(server: Server) -> None:
    """SSE: one chunk per finished candidate (answer), per verifier score, the selection; then the final
    chunk in the normal shape with the selected text, usage and the scaling summary."""
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0, timeout=300)
    stream = client.chat.completions.create(
        model=MODEL_NAME, messages=QUESTION, max_tokens=12, temperature=0.8, seed=3, stream=True,
        extra_body={"strategy": "bon", "budget": 3, "verifier": "task", "reference": "42", "extractor": "number"})
    chunks = [c.model_dump() for c in stream]
    events = [c["scaling_event"] for c in chunks if c.get("scaling_event")]
    kinds = [e["event"] for e in events]
    assert kinds.count("candidate") == 3 and kinds.count("score") == 3 and kinds[-1] == "selection"
    final = chunks[-1]
    assert final["choices"][0]["finish_reason"] in ("stop", "length")
    scaling = final["scaling"]
    assert isinstance(final["choices"][0]["delta"]["content"], str)
    by_index = {c["index"]: c for c in scaling["candidates"]}
    assert all(e["answer"] == by_index[e["index"]]["answer"] for e in events if e["event"] == "candidate")
    assert all(c["score"] == float(c["answer"] == "42") for c in scaling["candidates"])
    assert events[-1]["answer"] == scaling["answer"] and final["usage"]["scaling"]["num_samples"] == 3


def test_streamed_strategy_on_completions(server: Server) -> None:
    with httpx.stream("POST", f"{server.url}/v1/completions", timeout=300,
                      json={"prompt": "12 + 30 =", "max_tokens": 6, "temperature": 0.9, "seed": 1, "stream": True,
                            "strategy": "majority", "budget": 2}) as resp:
        assert resp.status_code == 200
        lines = [ln for ln in resp.iter_lines() if ln.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    payloads = [json.loads(ln[6:]) for ln in lines[:-1]]
    assert all(p["object"] == "text_completion" for p in payloads)
    assert sum(1 for p in payloads if p.get("scaling_event", {}).get("event") == "candidate") == 2
    assert isinstance(payloads[-1]["choices"][0]["text"], str) and payloads[-1]["usage"]["completion_tokens"] > 0
    assert payloads[-1]["scaling"]["strategy"] == "majority"


def test_prompt_token_counters_add_up_after_a_mixed_workload(server: Server) -> None:
    """prefilled + reused (prefix cache) + reused (fork) = admitted, and admitted is every sample's context:
    plain requests, a repeated prompt (prefix cache), n = 3 (fork) and a judge strategy (forks of contexts)."""
    names = ("prompt_tokens_admitted", "prompt_tokens_prefilled", "prompt_tokens_reused_prefix_cache",
             "prompt_tokens_reused_fork", "scaling_verifier_tokens")
    before = server.metrics()
    url = f"{server.url}/v1/completions"
    prompt = "The quick brown fox jumps over the lazy dog. " * 6
    admitted = 0
    for body in ({"prompt": prompt, "max_tokens": 3}, {"prompt": prompt, "max_tokens": 3},
                 {"prompt": "Once upon a time", "max_tokens": 4, "n": 3, "temperature": 1.0, "seed": 2}):
        resp = httpx.post(url, json=body, timeout=300).json()
        admitted += resp["usage"]["prompt_tokens"] * body.get("n", 1)
    chat = httpx.post(f"{server.url}/v1/chat/completions", timeout=300, json={
        "messages": QUESTION, "max_tokens": 6, "temperature": 0.8, "seed": 1, "strategy": "bon", "budget": 3,
        "verifier": "judge"}).json()
    acc = chat["usage"]["scaling"]
    admitted += acc["policy_prompt_tokens"] + acc["verifier_prompt_tokens"]
    after = server.metrics()
    delta = {n: after[f"mixserve:{n}_total"] - before.get(f"mixserve:{n}_total", 0.0) for n in names}
    assert delta["prompt_tokens_admitted"] == admitted
    assert (delta["prompt_tokens_prefilled"] + delta["prompt_tokens_reused_prefix_cache"]
            + delta["prompt_tokens_reused_fork"]) == admitted
    assert delta["prompt_tokens_reused_prefix_cache"] > 0  # the repeated prompt's full blocks
    assert delta["prompt_tokens_reused_fork"] >= acc["verifier_reused_tokens"] > 0  # judge forks share KV
    assert delta["scaling_verifier_tokens"] == acc["verifier_prefill_tokens"] + acc["verifier_generated_tokens"]
