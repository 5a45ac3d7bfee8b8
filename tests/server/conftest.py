"""The real `mixserve serve` process on a free loopback port, with the embedded default model.

Each server is bounded: it must be healthy within START_TIMEOUT_S and is stopped (SIGTERM, then
SIGKILL) when its fixture ends.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.harness import wait_healthy

START_TIMEOUT_S = 180
MODEL_NAME = "smollm2"
MAX_MODEL_LEN = 2048


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Server:
    proc: subprocess.Popen[bytes]
    url: str
    log: Path

    def metrics(self) -> dict[str, float]:
        """Unlabelled view of /metrics: `name` -> value (labels dropped; histograms' _count/_sum kept)."""
        text = httpx.get(f"{self.url}/metrics", timeout=10).text
        values: dict[str, float] = {}
        for line in text.splitlines():
            if line.startswith("#") or not line.strip():
                continue
            name_labels, value = line.rsplit(" ", 1)
            name = name_labels.split("{", 1)[0]
            values[name] = values.get(name, 0.0) + float(value)
        return values

    def stop(self, timeout_s: float = 60) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                return self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return int(self.proc.returncode)


def start_server(model_path: str, log_dir: Path, *extra: str) -> Server:
    port = free_port()
    log = log_dir / f"server-{port}.log"
    cmd = [sys.executable, "-m", "mixserve", "serve", "--model", model_path, "--served-model-name", MODEL_NAME,
           "--host", "127.0.0.1", "--port", str(port), "--threads", "2", "--kv-cache-gib", "0.25",
           "--max-model-len", str(MAX_MODEL_LEN), "--weight-format", "dense",
           "--log-level", "warning", *extra]
    with open(log, "wb") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    server = Server(proc, f"http://127.0.0.1:{port}", log)
    if wait_healthy(proc, server.url, log, START_TIMEOUT_S, 0.5):
        return server
    server.stop()
    raise RuntimeError(f"server not healthy ({START_TIMEOUT_S}s at most):\n{log.read_text()[-3000:]}")


@pytest.fixture(scope="session")
def server(smollm2_path: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    srv = start_server(smollm2_path, tmp_path_factory.mktemp("server"))
    try:
        yield srv
    finally:
        srv.stop()


def wait_until(predicate, timeout_s: float = 60, interval_s: float = 0.2) -> bool:  # noqa: ANN001
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval_s)
    return predicate()
