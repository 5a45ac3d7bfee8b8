"""A real cloud process on loopback (127.0.0.1, a free port, a time limit), an edge talking WebSocket.

- `mixserve cloud` + `mixserve edge` as two processes: τ >= 1 gives the whole model's greedy tokens
  exactly (fp32 transfer), τ = 0 the edge-only exit model's;
- the cloud killed mid-generation: the edge finishes standalone and nothing already emitted changes;
  the cloud restarted on the same port: the edge reconnects and the session is rebuilt.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from mixserve.edge.codec import Codec
from mixserve.edge.config import EdgeConfig
from mixserve.edge.edge import EdgeRunner
from mixserve.edge.link import websocket_connector
from tests.edge.conftest import PROMPT, Split
from tests.edge.test_resilience import assert_cloud_tokens_follow_the_context
from tests.edge.test_split import greedy

ROOT = Path(__file__).resolve().parents[2]
TIME_LIMIT_S = 120.0
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class CloudProcess:
    def __init__(self, model: Path, split_layer: int, port: int) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mixserve", "cloud", "--model", str(model), "--split-layer", str(split_layer),
             "--host", "127.0.0.1", "--port", str(port), "--threads", "1"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV, cwd=ROOT)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()  # the "listening on" line, once the model is loaded
        if "listening on" not in line:
            self.stop()
            pytest.fail(f"cloud did not start: {line!r} {self.proc.stderr.read() if self.proc.stderr else ''}")
        self.url = line.split("listening on ")[1].strip()

    def stop(self, graceful: bool = False) -> None:
        if self.proc.poll() is None:
            self.proc.terminate() if graceful else self.proc.kill()
        self.proc.wait(timeout=10)  # SIGTERM: the server stops and prints its counters


@pytest.fixture
def cloud(llama: Split) -> Iterator[CloudProcess]:
    proc = CloudProcess(llama.path, 2, free_port())
    yield proc
    if proc.proc.poll() is None:
        proc.stop(graceful=True)
        assert proc.proc.stderr is not None and "num_infers" in proc.proc.stderr.read()


def run_edge(llama: Split, url: str, tau: float) -> dict:
    prompt = " ".join(f"t{i}" for i in PROMPT)
    out = subprocess.run(
        [sys.executable, "-m", "mixserve", "edge", prompt, "--model", str(llama.path), "--split-layer", "2",
         "--cloud", url, "--exit-threshold", str(tau), "--codec", "fp32", "--max-tokens", "10", "--ignore-eos",
         "--json", "--threads", "1", "--cloud-timeout", "60"],
        capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=TIME_LIMIT_S, check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["prompt_token_ids"] == PROMPT
    return result


def test_two_processes_reproduce_the_whole_and_the_exit_model(llama: Split, cloud: CloudProcess) -> None:
    full = run_edge(llama, cloud.url, 1.0)
    assert full["token_ids"] == greedy(llama.model, PROMPT, 10) and set(full["sources"]) == {"cloud"}
    exit_only = run_edge(llama, cloud.url, 0.0)
    assert exit_only["token_ids"] == greedy(llama.model, PROMPT, 10, end=2) and set(exit_only["sources"]) == {"edge"}
    assert full["usage"]["link_bytes_sent"] > exit_only["usage"]["link_bytes_sent"] > 10 * 256  # uploads all the same


def test_cloud_killed_then_restarted(llama: Split, cloud: CloudProcess) -> None:
    config = EdgeConfig(split_layer=2, exit_threshold=1.0, codec=Codec.FP32, cloud_timeout_s=10.0,
                        retry_interval_s=0.0, max_len=64)
    edge = EdgeRunner(llama.model, llama.cfg, config, websocket_connector(cloud.url, 2.0))
    port = int(cloud.url.rsplit(":", 1)[1])
    seen: list[tuple[int, str]] = []
    procs = [cloud]
    deadline = time.monotonic() + TIME_LIMIT_S

    def events(token: int, source: str) -> None:
        seen.append((token, source))
        assert time.monotonic() < deadline
        if len(seen) == 4:
            procs[0].stop()  # killed: the next deferrals find the link down
        if len(seen) == 8:
            procs.append(CloudProcess(llama.path, 2, port))  # back: reconnect, session unknown -> rebuilt

    try:
        result = edge.generate(PROMPT, 14, ignore_eos=True, on_token=events)
    finally:
        edge.close()
        procs[-1].stop()
    want = greedy(llama.model, PROMPT, 14)
    assert result.sources[:4] == ["cloud"] * 4 and result.token_ids[:4] == want[:4]
    assert result.sources[4:8] == ["standalone"] * 4
    assert result.sources[8:] == ["cloud"] * 6
    assert [t for t, _ in seen] == result.token_ids  # what was streamed is what was returned
    assert_cloud_tokens_follow_the_context(llama, result.token_ids, result.sources)
    assert edge.link.num_rebuilds == 1 and edge.link.num_reconnects == 1
