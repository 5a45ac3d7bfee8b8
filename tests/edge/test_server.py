"""The edge's OpenAI API: the same response shapes as `mixserve serve`, the split visible only in usage."""

from __future__ import annotations

import json

import pytest
from fastapi.testclient import TestClient

from mixserve.edge.api import EdgeLLM
from mixserve.edge.link import LocalLink
from tests.edge.conftest import PROMPT, Split
from tests.edge.test_split import greedy


@pytest.fixture(scope="module")
def client(llama: Split) -> TestClient:
    from mixserve.edge.server import build_edge_app

    link = LocalLink(llama.cloud(2))
    llm = EdgeLLM(str(llama.path), None, 2, exit_threshold=1.0, codec="fp32", max_len=64, connect=lambda: link)
    return TestClient(build_edge_app(llm, "tiny-split"))


def test_completion_is_the_whole_model_and_usage_shows_the_split(client: TestClient, llama: Split) -> None:
    r = client.post("/v1/completions", json={"model": "tiny-split", "prompt": PROMPT, "max_tokens": 6,
                                             "ignore_eos": True, "temperature": 0})
    assert r.status_code == 200, r.text
    body = r.json()
    from mixserve.loading.tokenizer import load_tokenizer
    detok = load_tokenizer(llama.path).detokenizer(PROMPT)
    assert body["choices"][0]["text"] == detok.push_many(greedy(llama.model, PROMPT, 6)) + detok.flush()
    usage = body["usage"]
    assert (usage["prompt_tokens"], usage["completion_tokens"], usage["cloud_tokens"], usage["edge_tokens"]) == \
        (len(PROMPT), 6, 6, 0)
    assert usage["link_bytes_sent"] > 0 and body["object"] == "text_completion"


def test_streaming_matches_and_reports_usage(client: TestClient) -> None:
    req = {"prompt": PROMPT, "max_tokens": 6, "ignore_eos": True}
    whole = client.post("/v1/completions", json=req).json()["choices"][0]["text"]
    with client.stream("POST", "/v1/completions",
                       json={**req, "stream": True, "stream_options": {"include_usage": True}}) as r:
        events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert "".join(c["choices"][0]["text"] for c in chunks if c["choices"]) == whole
    assert chunks[-1]["usage"]["completion_tokens"] == 6


def test_chat_and_refusals_and_metrics(client: TestClient) -> None:
    r = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "t5 t6"}],
                                                  "max_tokens": 3})
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["role"] == "assistant"
    for field, value in (("temperature", 0.7), ("n", 2), ("stop", ["x"])):
        r = client.post("/v1/completions", json={"prompt": PROMPT, field: value})
        assert r.status_code == 400 and r.json()["error"]["param"] == field
    text = client.get("/metrics").text
    assert 'mixserve_edge_tokens_total{source="cloud"}' in text and "mixserve_edge_link_bytes_sent_total" in text
    assert client.get("/v1/models").json()["data"][0]["id"] == "tiny-split"
