"""A multi-model `mixserve serve` (models file, tiny random models, a budget for one model at a time)
driven by the official openai client: routing by `model`, /v1/models states, load/unload, streaming,
404 for unknown models, a broken model's clear error while the others keep serving, per-model metrics."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest

from tests.loading.test_safetensors import tiny_llama, write_tokenizer
from tests.server.conftest import Server, free_port


def _folder(root: Path, name: str) -> Path:
    folder = root / name
    tiny_llama(folder)
    write_tokenizer(folder, generation_eos=[256])
    return folder


@pytest.fixture(scope="module")
def pool_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    root = tmp_path_factory.mktemp("pool")
    a, b = _folder(root, "a"), _folder(root, "b")
    broken = root / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    models = [{"name": "a", "model": str(a), "kv_cache_mib": 8, "max_model_len": 2048},
              {"name": "b", "model": str(b), "kv_cache_mib": 8, "max_model_len": 2048},
              {"name": "broken", "model": str(broken), "kv_cache_mib": 8}]
    (root / "models.json").write_text(json.dumps({"models": models}))
    (root / "profiles.json").write_text(json.dumps({"scores": {"a": {"arithmetic": 2}, "b": {"arithmetic": -1}},
                                                    "aggregator": "b"}))
    port = free_port()
    log = root / "server.log"
    cmd = [sys.executable, "-m", "mixserve", "serve", "--models-file", str(root / "models.json"),
           "--pool-memory-budget", "12MiB",
           "--mixture", f"tiny={root / 'profiles.json'}", "--host", "127.0.0.1", "--port", str(port),
           "--log-level", "warning"]
    with open(log, "wb") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    server = Server(proc, f"http://127.0.0.1:{port}", log)
    deadline = time.monotonic() + 120
    while True:
        try:
            if httpx.get(f"{server.url}/health", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            server.stop()
            raise RuntimeError(f"server did not start:\n{log.read_text()[-3000:]}")
        time.sleep(0.3)
    try:
        yield server
    finally:
        server.stop()


def _states(server: Server) -> dict[str, str]:
    """Pool models' states (the mixture model is always "ready")."""
    data = httpx.get(f"{server.url}/v1/models", timeout=10).json()["data"]
    assert {"id": "mixture/tiny", "status": "ready"}.items() <= data[-1].items()
    return {m["id"]: m["status"] for m in data[:-1]}


def test_routing_states_load_unload_and_errors(pool_server: Server) -> None:
    client = openai.OpenAI(base_url=f"{pool_server.url}/v1", api_key="x", timeout=120, max_retries=0)
    assert _states(pool_server) == {"a": "unloaded", "b": "unloaded", "broken": "unloaded"}
    assert [m.id for m in client.models.list()] == ["a", "b", "broken", "mixture/tiny"]

    chat = client.chat.completions.create(model="a", messages=[{"role": "user", "content": "hi"}], max_tokens=4,
                                          temperature=0)
    assert chat.model == "a" and chat.usage is not None and chat.usage.completion_tokens == 4
    assert _states(pool_server)["a"] == "loaded"

    done = client.completions.create(model="b", prompt="hello", max_tokens=3, temperature=0)
    assert done.model == "b" and len(done.choices) == 1
    assert _states(pool_server) == {"a": "unloaded", "b": "loaded", "broken": "unloaded"}  # budget: one model

    chunks = list(client.chat.completions.create(model="a", messages=[{"role": "user", "content": "yo"}],
                                                 max_tokens=5, temperature=0, stream=True))
    assert all(c.model == "a" for c in chunks) and chunks[-1].choices[0].finish_reason == "length"
    assert _states(pool_server)["a"] == "loaded"

    with pytest.raises(openai.NotFoundError) as missing:
        client.completions.create(model="zzz", prompt="x", max_tokens=1)
    assert "known models: a, b, broken, mixture/tiny" in str(missing.value) and missing.value.code == "model_not_found"

    with pytest.raises(openai.APIStatusError) as broken:
        client.completions.create(model="broken", prompt="x", max_tokens=1)
    assert broken.value.status_code == 503 and broken.value.code == "model_load_failed"
    assert "'broken' failed to load" in str(broken.value)
    again = client.completions.create(model="b", prompt="x", max_tokens=2, temperature=0)  # others keep serving
    assert again.model == "b"
    info = {m["id"]: m for m in httpx.get(f"{pool_server.url}/v1/models", timeout=10).json()["data"]}
    assert info["broken"]["status"] == "unloaded" and "config.json" in (info["broken"]["last_error"] or "")

    r = httpx.post(f"{pool_server.url}/v1/models/unload", json={"model": "b"}, timeout=30)
    assert r.status_code == 200 and _states(pool_server)["b"] == "unloaded"
    r = httpx.post(f"{pool_server.url}/v1/models/load", json={"model": "a"}, timeout=60)
    assert r.json() == {"model": "a", "status": "loaded"} and _states(pool_server)["a"] == "loaded"
    r = httpx.post(f"{pool_server.url}/v1/models/load", json={"model": "nope"}, timeout=10)
    assert r.status_code == 404

    text = httpx.get(f"{pool_server.url}/metrics", timeout=10).text
    assert 'mixserve:request_success_total{finished_reason="length",model_name="a"}' in text
    assert 'model_name="b"' in text and "mixserve:pool_resident_bytes" in text
    assert "mixserve:pool_loads_total" in text and "mixserve:pool_evictions_total" in text
    assert 'mixserve:model_loaded{model_name="a"} 1.0' in text


def test_mixture_model_recruits_aggregates_and_batches(pool_server: Server) -> None:
    client = openai.OpenAI(base_url=f"{pool_server.url}/v1", api_key="x", timeout=300, max_retries=0)

    def ask(text: str) -> dict:
        r = httpx.post(f"{pool_server.url}/v1/chat/completions", timeout=300, json={
            "model": "mixture/tiny", "messages": [{"role": "user", "content": text}]})
        assert r.status_code == 200, r.text
        return r.json()

    # Concurrent questions run as one batch, grouped by model. The batch window is 50 ms: on a loaded
    # machine the second request can reach the server after it closed, so try a few pairs.
    for _ in range(4):
        with ThreadPoolExecutor(2) as ex:
            first, second = ex.map(ask, ["What is 2 + 3?", "What is 4 + 4?"])
        if first["usage"]["mixture"]["batch_questions"] == 2:
            break
    for out in (first, second):
        mix = out["usage"]["mixture"]
        assert out["model"] == "mixture/tiny" and len(mix["recruited"]) == 3 == len(mix["answers"])
        assert set(mix["recruited"]) <= {"a", "b"} and mix["aggregator"] == "b"
        assert set(mix["batch_compute"]) <= {"a", "b"} and isinstance(out["choices"][0]["message"]["content"], str)
    assert first["usage"]["mixture"]["batch_questions"] == 2  # both in one batch
    chunks = list(client.chat.completions.create(model="mixture/tiny", stream=True,
                                                 messages=[{"role": "user", "content": "What is 1 + 1?"}]))
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) is not None
