"""`mixserve serve --cloud-split-layer K`: one real server process on loopback answers ordinary OpenAI
requests and edge sessions (ws://HOST:PORT/v1/edge/ws) over the same weights."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from mixserve.edge.codec import Codec
from mixserve.edge.config import EdgeConfig
from mixserve.edge.edge import EdgeRunner, Stopping
from mixserve.edge.link import websocket_connector
from mixserve.edge.sampling import for_sample
from mixserve.sampling_params import SamplingParams
from tests.edge.conftest import PROMPT, Split
from tests.edge.test_split import greedy
from tests.server.conftest import MODEL_NAME, Server, start_server


@pytest.fixture(scope="module")
def server(llama: Split, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    srv = start_server(str(llama.path), Path(tmp_path_factory.mktemp("serve-cloud")), "--cloud-split-layer", "2",
                       "--threads", "1")
    yield srv
    srv.stop()


def edge(llama: Split, server: Server) -> EdgeRunner:
    config = EdgeConfig(split_layer=2, exit_threshold=1.5, codec=Codec.FP32, cloud_timeout_s=60.0, max_len=64)
    url = server.url.replace("http://", "ws://") + "/v1/edge/ws"
    return EdgeRunner(llama.model, llama.cfg, config, websocket_connector(url, 10.0), eos_token_ids=(2,))


def test_one_server_answers_requests_and_edge_sessions(llama: Split, server: Server) -> None:
    runner = edge(llama, server)
    try:
        result = runner.generate(PROMPT, 8, ignore_eos=True)
        assert result.token_ids == greedy(llama.model, PROMPT, 8) and set(result.sources) == {"cloud"}
        p = SamplingParams(temperature=0.9, seed=13, max_tokens=8, ignore_eos=True)
        sampled = runner.generate(PROMPT, 8, sampling=for_sample(p, len(PROMPT), p.seed), stopping=Stopping(True))
    finally:
        runner.close()
    r = httpx.post(f"{server.url}/v1/completions", timeout=60,
                   json={"model": MODEL_NAME, "prompt": PROMPT, "max_tokens": 8, "temperature": 0.9, "seed": 13,
                         "ignore_eos": True})
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["text"] == llama_text(llama, sampled.token_ids)


def llama_text(llama: Split, ids: list[int]) -> str:
    from mixserve.loading.tokenizer import load_tokenizer

    detok = load_tokenizer(llama.path).detokenizer(PROMPT)
    return detok.push_many(ids) + detok.flush()
