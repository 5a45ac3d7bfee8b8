"""The official `openai` client against a real pair on loopback: `mixserve cloud` and
`mixserve edge --serve` as two processes (free ports, bounded start, always stopped).

τ > 1 (always defer) and fp32 transfer: seeded sampled completions and chat completions equal the
unsplit engine's; streaming, n > 1, stop strings and logprobs work as on `mixserve serve`; the split
shows only in the usage fields; refused fields are 400s naming the field.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest

from mixserve.sampling_params import SamplingParams
from tests.edge.conftest import PROMPT, Split
from tests.edge.test_processes import ENV, ROOT, CloudProcess, free_port
from tests.harness import wait_healthy

START_TIMEOUT_S = 120.0
TEXT = " ".join(f"t{i}" for i in PROMPT)


@pytest.fixture(scope="module")
def pair(llama: Split, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    cloud = CloudProcess(llama.path, 2, free_port())
    port = free_port()
    log = Path(tmp_path_factory.mktemp("edge-log")) / "edge.log"
    with open(log, "wb") as fh:
        edge = subprocess.Popen(
            [sys.executable, "-m", "mixserve", "edge", "--serve", "--model", str(llama.path), "--split-layer", "2",
             "--cloud", cloud.url, "--exit-threshold", "1.5", "--codec", "fp32", "--max-len", "64",
             "--served-model-name", "tiny-split", "--host", "127.0.0.1", "--port", str(port), "--threads", "1",
             "--cloud-timeout", "60"], stdout=fh, stderr=subprocess.STDOUT, env=ENV, cwd=ROOT)
    url = f"http://127.0.0.1:{port}"
    try:
        assert wait_healthy(edge, url, log, START_TIMEOUT_S, 0.5), log.read_text()[-3000:]
        yield url
    finally:
        edge.terminate()
        try:
            edge.wait(timeout=20)
        except subprocess.TimeoutExpired:
            edge.kill()
            edge.wait()
        cloud.stop(graceful=True)


@pytest.fixture(scope="module")
def client(pair: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{pair}/v1", api_key="none", timeout=60.0, max_retries=0)


@pytest.fixture(scope="module")
def engine(llama: Split) -> Any:
    from mixserve.llm import LLM

    return LLM(str(llama.path), num_blocks=16, block_size=16, max_model_len=64)


def test_seeded_completions_equal_the_unsplit_engine(client: openai.OpenAI, engine: Any) -> None:
    got = client.completions.create(model="tiny-split", prompt=TEXT, max_tokens=8, temperature=0.8, top_p=0.9,
                                    seed=21, n=2, logprobs=1, extra_body={"ignore_eos": True, "top_k": 50})
    want = engine.generate([TEXT], SamplingParams(temperature=0.8, top_p=0.9, top_k=50, seed=21, n=2, max_tokens=8,
                                                  ignore_eos=True, logprobs=1))[0]
    assert [c.text for c in got.choices] == [o.text for o in want.outputs]
    assert got.choices[0].logprobs is not None and len(got.choices[0].logprobs.token_logprobs or []) == 8
    usage = got.usage
    assert usage is not None and usage.completion_tokens == 16
    extra = usage.model_extra or {}
    assert (extra["cloud_tokens"], extra["edge_tokens"], extra["deferred_tokens"]) == (16, 0, 16)
    assert extra["link_bytes_sent"] > 0 and extra["link_bytes_received"] > 0


def test_chat_stream_equals_the_whole_response_and_stop_strings_cut(client: openai.OpenAI, engine: Any) -> None:
    messages: Any = [{"role": "user", "content": "t5 t6 t7"}]
    kw: Any = dict(model="tiny-split", messages=messages, max_tokens=8, temperature=1.0, seed=4,
                   extra_body={"ignore_eos": True})
    whole = client.chat.completions.create(**kw)
    text = whole.choices[0].message.content or ""
    stream = client.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
    assert chunks[-1].usage is not None and (chunks[-1].usage.model_extra or {})["cloud_tokens"] == 8
    stop = text.split()[2]
    cut = client.chat.completions.create(**kw, stop=[stop])
    assert cut.choices[0].finish_reason == "stop" and cut.choices[0].message.content == text[:text.index(stop)]


def test_models_and_refusals(client: openai.OpenAI) -> None:
    assert [m.id for m in client.models.list().data] == ["tiny-split"]
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="tiny-split", messages=[{"role": "user", "content": "t5"}],
                                       response_format={"type": "json_object"})
    assert err.value.body is not None and err.value.body["param"] == "response_format"  # type: ignore[index]
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model="tiny-split", prompt=TEXT, echo=True, logprobs=1, max_tokens=2)
    assert "echo" in str(err.value)
