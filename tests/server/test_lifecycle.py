"""Disconnects free KV blocks; a full queue answers 429 without hurting accepted requests; SIGTERM exits 0."""

from __future__ import annotations

import json
import signal
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.server.conftest import Server, start_server, wait_until

LONG = {"prompt": "Count from one to a thousand: one, two,", "max_tokens": 400, "ignore_eos": True,
        "temperature": 0}


def idle(server: Server) -> bool:
    m = server.metrics()
    return (m["mixserve:kv_cache_usage_perc"] == 0.0 and m["mixserve:num_requests_running"] == 0
            and m["mixserve:num_requests_waiting"] == 0)


def test_stream_disconnect_aborts_and_frees_kv(server: Server) -> None:
    assert wait_until(lambda: idle(server), 60)
    before = server.metrics().get("mixserve:request_success_total", 0.0)
    with httpx.Client(timeout=60) as client, \
            client.stream("POST", f"{server.url}/v1/completions", json={**LONG, "stream": True}) as resp:
        assert resp.status_code == 200
        lines = resp.iter_lines()
        got = [line for _, line in zip(range(6), lines) if line.startswith("data:")]
        assert got
        assert server.metrics()["mixserve:kv_cache_usage_perc"] > 0  # the request holds blocks now
    # the client went away mid-stream: the request is aborted and its blocks return
    assert wait_until(lambda: idle(server), 60), server.metrics()
    text = httpx.get(f"{server.url}/metrics").text
    assert 'finished_reason="abort"' in text
    assert server.metrics()["mixserve:request_success_total"] > before


def test_non_stream_disconnect_aborts(server: Server) -> None:
    assert wait_until(lambda: idle(server), 60)
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{server.url}/v1/completions", json=LONG, timeout=httpx.Timeout(60, read=1.5))
    assert wait_until(lambda: idle(server), 60), server.metrics()


@pytest.fixture(scope="module")
def small_server(smollm2_path: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """Room for one running request and one waiting; in-flight work gets 60 s after SIGTERM."""
    srv = start_server(smollm2_path, tmp_path_factory.mktemp("small"), "--max-num-seqs", "1",
                       "--max-num-waiting", "1", "--shutdown-timeout", "60")
    try:
        yield srv
    finally:
        srv.stop()


def test_full_queue_answers_429_and_accepted_requests_finish(small_server: Server) -> None:
    body = {**LONG, "max_tokens": 24}
    results: list[httpx.Response] = []

    def call() -> None:
        results.append(httpx.post(f"{small_server.url}/v1/completions", json=body, timeout=300))

    threads = [threading.Thread(target=call) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    statuses = sorted(r.status_code for r in results)
    assert set(statuses) <= {200, 429}, [r.text for r in results]
    assert 200 in statuses and 429 in statuses, statuses
    for r in results:
        if r.status_code == 429:
            assert r.json()["error"]["type"] == "rate_limit_error"
            assert r.headers["retry-after"]
        else:
            assert r.json()["usage"]["completion_tokens"] == 24
    assert wait_until(lambda: idle(small_server), 60)
    assert httpx.get(f"{small_server.url}/health").status_code == 200


def test_sigterm_finishes_in_flight_stream_and_exits_zero(small_server: Server, tmp_path: Path) -> None:
    frames: list[str] = []
    started = threading.Event()

    def stream() -> None:
        body = {**LONG, "max_tokens": 30, "stream": True}
        with httpx.Client(timeout=120) as client, \
                client.stream("POST", f"{small_server.url}/v1/completions", json=body) as resp:
            for line in resp.iter_lines():
                if line.startswith("data:"):
                    frames.append(line[5:].strip())
                    started.set()

    reader = threading.Thread(target=stream)
    reader.start()
    assert started.wait(120)
    small_server.proc.send_signal(signal.SIGTERM)
    reader.join(120)
    assert small_server.proc.wait(120) == 0
    assert frames[-1] == "[DONE]"
    last = json.loads(frames[-2])
    assert last["choices"][0]["finish_reason"] == "length"
    text = "".join(json.loads(f)["choices"][0]["text"] for f in frames[:-1])
    assert text
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{small_server.url}/health", timeout=2)


def test_sigterm_after_timeout_aborts_and_exits_zero(smollm2_path: str, tmp_path: Path) -> None:
    srv = start_server(smollm2_path, tmp_path, "--shutdown-timeout", "1")
    frames: list[str] = []
    started = threading.Event()

    def stream() -> None:
        try:
            with httpx.Client(timeout=120) as client, \
                    client.stream("POST", f"{srv.url}/v1/completions", json={**LONG, "max_tokens": 1500,
                                                                            "stream": True}) as resp:
                for line in resp.iter_lines():
                    frames.append(line)
                    started.set()
        except httpx.HTTPError:
            pass  # the server cut the connection when the grace period ended

    reader = threading.Thread(target=stream)
    reader.start()
    try:
        assert started.wait(120)
        srv.proc.send_signal(signal.SIGTERM)
        assert srv.proc.wait(60) == 0
        reader.join(60)
        assert not any('"finish_reason":"length"' in f for f in frames)
    finally:
        srv.stop()
