"""A real Ray cluster for tests: a head and a second node process (1 CPU each) with a private auth token,
bounded in time and stopped (their whole process groups) afterwards; and servers started on it."""

from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from tests.harness import wait_healthy

START_TIMEOUT_S = 120


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def stop_group(proc: subprocess.Popen[bytes], timeout_s: float = 10) -> None:
    """SIGTERM the process group this test started, then SIGKILL what is left."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout_s)
            if sig == signal.SIGTERM:
                time.sleep(1)  # children of the group outlive the leader briefly; the SIGKILL sweeps them
        except subprocess.TimeoutExpired:
            pass


@dataclass
class RayCluster:
    address: str
    env: dict[str, str]
    procs: list[subprocess.Popen[bytes]]

    def stop(self) -> None:
        for proc in reversed(self.procs):
            stop_group(proc)


def start_ray_cluster(tmp: Path) -> RayCluster:
    """Head + worker node, 1 CPU each; raises RuntimeError when Ray cannot start."""
    ray_bin = str(Path(sys.executable).parent / "ray")
    root = str(Path(__file__).resolve().parents[2])
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32),
           "PYTHONPATH": os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH", "")) if p),
           "RAY_USAGE_STATS_ENABLED": "0"}
    port = free_port()
    host = socket.gethostbyname(socket.gethostname())  # Ray advertises the node's address, not loopback
    common = ["--block", "--num-cpus=1", "--disable-usage-stats"]
    log = open(tmp / "ray.log", "wb")
    head = subprocess.Popen([ray_bin, "start", "--head", f"--port={port}", "--include-dashboard=false",
                             f"--temp-dir={tmp / 'ray'}", *common], env=env, stdout=log, stderr=log,
                            start_new_session=True)
    cluster = RayCluster(f"{host}:{port}", env, [head])
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            try:
                socket.create_connection((host, port), timeout=1).close()
                break
            except OSError:
                if head.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"Ray head did not start:\n{(tmp / 'ray.log').read_text()[-2000:]}") from None
                time.sleep(0.3)
        cluster.procs.append(subprocess.Popen([ray_bin, "start", f"--address={cluster.address}", *common],
                                              env=env, stdout=log, stderr=log, start_new_session=True))
    except BaseException:
        cluster.stop()
        raise
    return cluster


@dataclass
class Server:
    proc: subprocess.Popen[bytes]
    url: str
    log: Path

    def get(self, path: str) -> dict:  # type: ignore[type-arg]
        return httpx.get(self.url + path, timeout=30).json()  # type: ignore[no-any-return]

    def post(self, path: str, body: dict | None = None) -> dict:  # type: ignore[type-arg]
        return httpx.post(self.url + path, json=body or {}, timeout=120).json()  # type: ignore[no-any-return]

    def stop(self) -> None:
        stop_group(self.proc, timeout_s=30)


def start_server(model: Path, log_dir: Path, env: dict[str, str], *extra: str) -> Server:
    """`mixserve serve` (with `extra`, e.g. --ray) on a free loopback port, healthy or raising."""
    port = free_port()
    log = log_dir / f"server-{port}.log"
    cmd = [sys.executable, "-m", "mixserve", "serve", "--model", str(model), "--served-model-name", "tiny",
           "--host", "127.0.0.1", "--port", str(port), "--threads", "1", "--num-blocks", "128",
           "--block-size", "4", "--max-model-len", "512", "--log-level", "warning", *extra]
    with open(log, "wb") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True,
                                env={**env, "PYTHONUNBUFFERED": "1"})
    server = Server(proc, f"http://127.0.0.1:{port}", log)
    if wait_healthy(proc, server.url, log, 180, 0.3):
        return server
    server.stop()
    raise RuntimeError(f"server not healthy:\n{log.read_text()[-3000:]}")
