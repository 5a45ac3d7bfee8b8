"""Soak `mixserve serve` on loopback with mixed valid, invalid and disconnecting clients at once.

    python benchmarks/soak_server.py                    # ~2 minutes, 6 clients
    python benchmarks/soak_server.py --duration 600     # up to 10 minutes

Reports requests per status (5xx must be 0), KV blocks back to idle afterwards, server RSS growth and
/health latency (p50/p99/max) during the soak. Writes benchmarks/results/soak_server.json and .png.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import socket
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.server.conftest import start_server  # noqa: E402

C = "/v1/completions"
INVALID = [
    b'{"prompt": "x", "max_tokens": -1}', b"{not json", b'{"prompt": "a\\ud800"}',
    b'{"prompt": ' + b"[" * 20000 + b"]" * 20000 + b"}", b'{"prompt": "x", "seed": 18446744073709551616}',
    b'{"prompt": "x", "temperature": 1e999}', b'{"messages": []}', b'{"prompt": "x", "\\u00e9\\r\\n": 1}',
]


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


class Soak:
    def __init__(self, url: str, deadline: float) -> None:
        self.url, self.deadline = url, deadline
        self.statuses: Counter[str] = Counter()
        self.lock = threading.Lock()
        self.health: list[tuple[float, float]] = []

    def count(self, kind: str, status: int | str) -> None:
        with self.lock:
            self.statuses[f"{kind}:{status}"] += 1

    def valid(self, rng: random.Random) -> None:
        with httpx.Client(timeout=120) as client:
            while time.monotonic() < self.deadline:
                body = {"prompt": rng.choice(["Hello", "One, two,", "The sky is"]), "max_tokens": rng.randint(1, 24),
                        "temperature": rng.choice([0, 0.7]), "n": rng.choice([1, 2]), "stream": rng.random() < 0.3}
                self.count("valid", client.post(self.url + C, json=body).status_code)

    def invalid(self, rng: random.Random) -> None:
        with httpx.Client(timeout=120) as client:
            while time.monotonic() < self.deadline:
                resp = client.post(self.url + C, content=rng.choice(INVALID),
                                   headers={"content-type": "application/json"})
                self.count("invalid", resp.status_code)

    def disconnecting(self, rng: random.Random) -> None:
        host, port = self.url.removeprefix("http://").split(":")
        while time.monotonic() < self.deadline:
            if rng.random() < 0.5:  # stream a while, then vanish
                try:
                    with httpx.Client(timeout=60) as client, client.stream(
                            "POST", self.url + C, json={"prompt": "Count:", "max_tokens": 200, "stream": True,
                                                        "ignore_eos": True}) as resp:
                        for _, _line in zip(range(rng.randint(1, 8)), resp.iter_lines()):
                            pass
                    self.count("disconnect-stream", "gone")
                except httpx.HTTPError as exc:
                    self.count("disconnect-stream", type(exc).__name__)
            else:  # a body shorter than its Content-Length, then close
                with socket.create_connection((host, int(port)), timeout=10) as sock:
                    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                                 b"content-length: 500\r\n\r\n{\"prompt\": \"ab")
                self.count("disconnect-body", "gone")
            time.sleep(0.2)

    def poll_health(self, start: float) -> None:
        with httpx.Client(timeout=60) as client:
            while time.monotonic() < self.deadline:
                t0 = time.monotonic()
                status = client.get(self.url + "/health").status_code
                self.health.append((t0 - start, time.monotonic() - t0))
                self.count("health", status)
                time.sleep(0.1)


def metrics(url: str) -> dict[str, float]:
    values: dict[str, float] = {}
    for line in httpx.get(url + "/metrics", timeout=10).text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            key = name.split("{", 1)[0]
            values[key] = values.get(key, 0.0) + float(value)
    return values


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else float("nan")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(Path.home() / ".cache/mixserve/models/SmolLM2-135M-Instruct.Q4_1.gguf"))
    ap.add_argument("--duration", type=float, default=120.0, help="seconds (at most 600)")
    ap.add_argument("--clients", type=int, default=2, help="clients of each kind (valid, invalid, disconnecting)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/soak_server"))
    args = ap.parse_args()
    duration = min(args.duration, 600.0)
    log_dir = Path(args.out).parent
    log_dir.mkdir(parents=True, exist_ok=True)
    srv = start_server(args.model, log_dir)
    try:
        rss0 = rss_mib(srv.proc.pid)
        start = time.monotonic()
        soak = Soak(srv.url, start + duration)
        workers = [soak.valid, soak.invalid, soak.disconnecting] * args.clients
        threads = [threading.Thread(target=w, args=(random.Random(i),)) for i, w in enumerate(workers)]
        threads.append(threading.Thread(target=soak.poll_health, args=(start,)))
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        idle_deadline = time.monotonic() + 60
        while time.monotonic() < idle_deadline:
            m = metrics(srv.url)
            if m.get("mixserve:kv_cache_usage_perc", 1) == 0 and m.get("mixserve:num_requests_running", 1) == 0:
                break
            time.sleep(0.5)
        m = metrics(srv.url)
        rss1 = rss_mib(srv.proc.pid)
        log_text = srv.log.read_text()
    finally:
        srv.stop()
    lat = [x for _, x in soak.health]
    server_5xx = sum(v for k, v in soak.statuses.items() if k.split(":")[1].startswith("5"))
    result = {
        "duration_s": duration, "clients_per_kind": args.clients, "statuses": dict(sorted(soak.statuses.items())),
        "server_5xx": server_5xx, "kv_usage_after": m.get("mixserve:kv_cache_usage_perc"),
        "running_after": m.get("mixserve:num_requests_running"), "rss_mib_start": round(rss0, 1),
        "rss_mib_end": round(rss1, 1), "rss_growth_mib": round(rss1 - rss0, 1),
        "health_p50_s": pct(lat, 0.5), "health_p99_s": pct(lat, 0.99), "health_max_s": max(lat, default=0.0),
        "error_log_lines": sum("ERROR" in line for line in log_text.splitlines()),
    }
    print(f"{'requests by kind:status':<34} count")
    for key, value in result["statuses"].items():
        print(f"{key:<34} {value}")
    for key in ("server_5xx", "kv_usage_after", "running_after", "rss_mib_start", "rss_mib_end", "rss_growth_mib",
                "health_p50_s", "health_p99_s", "health_max_s", "error_log_lines"):
        value = result[key]
        print(f"{key:<34} {value:.3f}" if isinstance(value, float) else f"{key:<34} {value}")
    Path(args.out + ".json").write_text(json.dumps(result, indent=2))
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, ax = plt.subplots(figsize=(8, 3.5))
        ax.plot([t for t, _ in soak.health], lat, ".", ms=3)
        ax.set_xlabel("time (s)")
        ax.set_ylabel("/health latency (s)")
        ax.set_title(f"soak: 5xx={server_5xx}, p99={result['health_p99_s']:.3f}s, RSS +{result['rss_growth_mib']} MiB")
        fig.tight_layout()
        fig.savefig(args.out + ".png", dpi=100)
    except ImportError:
        pass
    ok = server_5xx == 0 and result["kv_usage_after"] == 0 and result["error_log_lines"] == 0
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    raise SystemExit(main())
