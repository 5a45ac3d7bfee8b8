"""The edge's OpenAI API is `mixserve serve`'s app over an `EdgeEngine` (in process, frames through a
LocalLink): the same response shapes, sampling, n, stop strings and logprobs, the split visible only
in usage; what the split model cannot do is a 400 naming the field."""

from __future__ import annotations

import json
from typing import Any

import pytest
from fastapi.testclient import TestClient

from mixserve.edge.api import EdgeLLM
from mixserve.edge.link import LocalLink
from tests.edge.conftest import PROMPT, Split
from tests.edge.test_split import greedy


@pytest.fixture(scope="module")
def client(llama: Split) -> Any:
    from mixserve.edge.server import build_edge_app

    link = LocalLink(llama.cloud(2))
    llm = EdgeLLM(str(llama.path), None, 2, exit_threshold=1.5, codec="fp32", max_len=64, connect=lambda: link)
    with TestClient(build_edge_app(llm, "tiny-split")) as c:
        yield c


@pytest.fixture(scope="module")
def engine(llama: Split) -> Any:
    from mixserve.llm import LLM

    return LLM(str(llama.path), num_blocks=16, block_size=16, max_model_len=64)


def test_completion_is_the_whole_model_and_usage_shows_the_split(client: TestClient, llama: Split) -> None:
    r = client.post("/v1/completions", json={"model": "tiny-split", "prompt": PROMPT, "max_tokens": 6,
                                             "ignore_eos": True, "temperature": 0})
    assert r.status_code == 200, r.text
    body = r.json()
    from mixserve.loading.tokenizer import load_tokenizer
    detok = load_tokenizer(llama.path).detokenizer(PROMPT)
    assert body["choices"][0]["text"] == detok.push_many(greedy(llama.model, PROMPT, 6)) + detok.flush()
    usage = body["usage"]
    assert (usage["prompt_tokens"], usage["completion_tokens"], usage["cloud_tokens"], usage["edge_tokens"],
            usage["deferred_tokens"]) == (len(PROMPT), 6, 6, 0, 6)
    assert usage["link_bytes_sent"] > 0 and body["object"] == "text_completion"


def test_seeded_sampling_n_and_logprobs_equal_the_engine(client: TestClient, engine: Any) -> None:
    from mixserve.sampling_params import SamplingParams

    req = {"prompt": PROMPT, "max_tokens": 8, "ignore_eos": True, "temperature": 0.9, "top_p": 0.95, "seed": 7,
           "n": 2, "logprobs": 2, "presence_penalty": 0.3}
    body = client.post("/v1/completions", json=req).json()
    want = engine.generate([PROMPT], SamplingParams(temperature=0.9, top_p=0.95, seed=7, n=2, max_tokens=8,
                                                    ignore_eos=True, logprobs=2, presence_penalty=0.3))[0]
    assert [c["text"] for c in body["choices"]] == [o.text for o in want.outputs]
    assert body["choices"][0]["text"] != body["choices"][1]["text"]
    for choice, out in zip(body["choices"], want.outputs):
        assert out.logprobs is not None
        got = choice["logprobs"]["token_logprobs"]
        assert got == pytest.approx([e[t].logprob for t, e in zip(out.token_ids, out.logprobs)], abs=1e-4)
        assert all(len(top) >= 2 for top in choice["logprobs"]["top_logprobs"])
    assert body["usage"]["cloud_tokens"] == 16 and body["usage"]["completion_tokens"] == 16


def test_streaming_and_stop_strings(client: TestClient) -> None:
    req: dict[str, Any] = {"prompt": PROMPT, "max_tokens": 8, "ignore_eos": True, "temperature": 1.0, "seed": 3}
    whole = client.post("/v1/completions", json=req).json()["choices"][0]["text"]
    with client.stream("POST", "/v1/completions",
                       json={**req, "stream": True, "stream_options": {"include_usage": True}}) as r:
        events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert "".join(c["choices"][0]["text"] for c in chunks if c["choices"]) == whole
    assert chunks[-1]["usage"]["completion_tokens"] == 8 and "link_bytes_sent" in chunks[-1]["usage"]
    words = whole.split()
    stop = words[3]
    cut = client.post("/v1/completions", json={**req, "stop": [stop]}).json()["choices"][0]
    assert cut["finish_reason"] == "stop" and cut["stop_reason"] == stop
    assert cut["text"] == whole[:whole.index(stop)]


def test_chat_refusals_and_metrics(client: TestClient) -> None:
    r = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "t5 t6"}],
                                                  "max_tokens": 3, "temperature": 0.7, "seed": 1})
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["role"] == "assistant"
    for extra, param in (({"response_format": {"type": "json_object"}}, "response_format"),
                         ({"echo": True, "logprobs": 1}, "echo"), ({"suffix": "x"}, "suffix"),
                         ({"temperature": -1}, "temperature")):
        body = {"prompt": PROMPT, **extra}
        if "response_format" in extra:
            body = {"messages": [{"role": "user", "content": "t5"}], **extra}
        r = client.post("/v1/chat/completions" if "messages" in body else "/v1/completions", json=body)
        assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text
    text = client.get("/metrics").text
    assert 'mixserve_edge_tokens_total{source="cloud"}' in text and "mixserve_edge_link_bytes_sent_total" in text
    assert "mixserve:request_success" in text
    assert client.get("/v1/models").json()["data"][0]["id"] == "tiny-split"
    assert client.get("/health").json() == {"status": "ok"}
    assert client.get("/edge/health").json()["cloud_connected"] is True


def test_without_a_cloud_usage_counts_standalone_tokens(llama: Split) -> None:
    from mixserve.edge.server import build_edge_app

    llm = EdgeLLM(str(llama.path), None, 2, exit_threshold=1.5, max_len=64, loaded=None)
    with TestClient(build_edge_app(llm, "tiny-split")) as c:
        body = c.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 5, "ignore_eos": True,
                                               "temperature": 1.0, "seed": 2, "n": 3}).json()
        assert len({choice["text"] for choice in body["choices"]}) > 1
        usage = body["usage"]
        assert (usage["standalone_tokens"], usage["deferred_tokens"], usage["cloud_tokens"]) == (15, 15, 0)
        assert c.get("/edge/health").json()["cloud_connected"] is False


def test_an_aborted_request_stops_and_reports_abort(llama: Split) -> None:
    import asyncio

    from mixserve.edge.engine import EdgeEngine
    from mixserve.outputs import FinishReason
    from mixserve.sampling_params import SamplingParams

    engine = EdgeEngine(EdgeLLM(str(llama.path), None, 2, exit_threshold=0.0, max_len=64))
    engine.start()

    async def run() -> list[object]:
        queue = await engine.add("r1", PROMPT, SamplingParams(max_tokens=40, ignore_eos=True, n=2, seed=1))
        outs = [await queue.get()]  # the first token is out: abort the rest
        engine.abort("r1")
        while not getattr(outs[-1], "finished", True):
            outs.append(await asyncio.wait_for(queue.get(), 30))
        return outs

    try:
        outs = asyncio.run(run())
    finally:
        engine.shutdown()
    parts = [p for out in outs for p in out.outputs]  # type: ignore[attr-defined]
    assert {p.index for p in parts if p.finish_reason is FinishReason.ABORT} == {0, 1}
    assert sum(len(p.token_ids) for p in parts) < 40
