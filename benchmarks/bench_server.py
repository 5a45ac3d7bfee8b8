"""Bounded load test of OpenAI servers on loopback: mixserve vs llama-cpp-python's server, same run.

For each concurrency C, a fixed number of streaming /v1/completions requests is issued by C clients
(each client sends its next request when the previous one ends). Reported per server and C, medians
over --repeats runs: throughput (generated tokens/s), p50/p99 time to first token, p50/p99 latency,
errors; for mixserve also KV-cache usage after the load (must be back to idle).

    .venv/bin/python benchmarks/bench_server.py --concurrency 1,8,32 --requests 32 --max-tokens 64

Peers run one at a time (2 cores): the mixserve server, then `python -m llama_cpp.server` from
`.peers/llamacpp` (bash benchmarks/setup_peers.sh llamacpp). Writes JSON + PNG to benchmarks/results/.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
PROMPTS = [
    "Write a short story about a robot who learns to paint.",
    "Explain how a hash map works, step by step.",
    "List ten facts about the ocean.",
    "Describe the water cycle to a ten-year-old.",
    "What are the pros and cons of electric cars?",
    "Summarise the plot of a heist movie you invent.",
    "Give a recipe for a vegetable soup.",
    "Explain recursion with an example in Python.",
]


@dataclass
class LoadResult:
    concurrency: int
    requests: int
    wall_s: float
    tokens: int
    errors: int
    ttft_s: list[float] = field(default_factory=list)
    latency_s: list[float] = field(default_factory=list)

    @property
    def throughput(self) -> float:
        return self.tokens / self.wall_s if self.wall_s else 0.0


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def one_request(client: httpx.AsyncClient, url: str, model: str, prompt: str, max_tokens: int,
                      seed: int) -> tuple[float, float, int]:
    """(ttft, latency, tokens) of one streamed completion; raises on any error."""
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.8, "seed": seed,
            "stream": True}
    start = time.perf_counter()
    first, tokens = None, 0
    async with client.stream("POST", f"{url}/v1/completions", json=body) as resp:
        if resp.status_code != 200:
            raise RuntimeError(f"HTTP {resp.status_code}: {(await resp.aread())[:200]!r}")
        async for line in resp.aiter_lines():
            if not line.startswith("data:") or line.strip() == "data: [DONE]":
                continue
            chunk = json.loads(line[5:])
            if "error" in chunk:
                raise RuntimeError(str(chunk["error"]))
            if chunk.get("choices") and chunk["choices"][0].get("text"):
                tokens += 1
                first = first or time.perf_counter()
    end = time.perf_counter()
    return (first or end) - start, end - start, tokens


async def run_load(url: str, model: str, concurrency: int, num_requests: int, max_tokens: int) -> LoadResult:
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(num_requests):
        queue.put_nowait(i)
    result = LoadResult(concurrency, num_requests, 0.0, 0, 0)
    limits = httpx.Limits(max_connections=concurrency + 4)

    async with httpx.AsyncClient(timeout=httpx.Timeout(600), limits=limits) as client:
        async def worker() -> None:
            while not queue.empty():
                i = queue.get_nowait()
                try:
                    ttft, latency, tokens = await one_request(client, url, model, PROMPTS[i % len(PROMPTS)],
                                                              max_tokens, seed=i)
                except Exception as exc:  # noqa: BLE001 - counted, reported
                    print(f"  request {i} failed: {exc}", file=sys.stderr)
                    result.errors += 1
                    continue
                result.ttft_s.append(ttft)
                result.latency_s.append(latency)
                result.tokens += tokens

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        result.wall_s = time.perf_counter() - start
    return result


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_healthy(url: str, proc: subprocess.Popen[bytes], path: str, timeout_s: float = 300) -> float:
    start = time.monotonic()
    while time.monotonic() - start < timeout_s:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            if httpx.get(url + path, timeout=2).status_code == 200:
                return time.monotonic() - start
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"server at {url} not ready after {timeout_s}s")


def kv_usage(url: str) -> float | None:
    for line in httpx.get(f"{url}/metrics", timeout=10).text.splitlines():
        if line.startswith("mixserve:kv_cache_usage_perc"):
            return float(line.rsplit(" ", 1)[1])
    return None


def server_command(name: str, model_path: str, port: int, threads: int, ctx: int) -> list[str]:
    if name == "mixserve":
        return [str(ROOT / ".venv/bin/python"), "-m", "mixserve", "serve", "--model", model_path, "--port", str(port),
                "--threads", str(threads), "--max-model-len", str(ctx), "--served-model-name", "bench",
                "--log-level", "warning"]
    return [str(ROOT / ".peers/llamacpp/bin/python"), "-m", "llama_cpp.server", "--model", model_path,
            "--port", str(port), "--n_threads", str(threads), "--n_threads_batch", str(threads), "--n_ctx", str(ctx),
            "--model_alias", "bench", "--interrupt_requests", "False"]


def bench_server(name: str, args: argparse.Namespace, model_path: str) -> dict:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = open(RESULTS / f"server_{name}.log", "wb")
    proc = subprocess.Popen(server_command(name, model_path, port, args.threads, args.ctx), stdout=log,
                            stderr=subprocess.STDOUT, cwd=ROOT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    out: dict = {"server": name, "levels": []}
    try:
        out["startup_s"] = wait_healthy(url, proc, "/health" if name == "mixserve" else "/v1/models")
        asyncio.run(run_load(url, "bench", 1, 2, 8))  # warm-up
        for c in args.concurrency:
            runs = [asyncio.run(run_load(url, "bench", c, args.requests, args.max_tokens)) for _ in range(args.repeats)]
            level = summarise(runs)
            if name == "mixserve":
                time.sleep(1.0)
                level["kv_usage_after"] = kv_usage(url)
            out["levels"].append(level)
            print(f"  {name:<9} C={c:<3} {level['throughput_tok_s']:7.1f} tok/s"
                  f"  ttft p50 {level['ttft_p50_s']*1e3:7.0f} ms  p99 {level['ttft_p99_s']*1e3:7.0f} ms"
                  f"  latency p50 {level['latency_p50_s']:6.2f} s"
                  f"  p99 {level['latency_p99_s']:6.2f} s  errors {level['errors']}"
                  + (f"  kv after {level.get('kv_usage_after')}" if name == "mixserve" else ""), flush=True)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            out["exit_code"] = proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            out["exit_code"] = proc.wait()
        log.close()
    return out


def summarise(runs: list[LoadResult]) -> dict:
    """Medians over repeats of each run's throughput and latency percentiles."""
    med = lambda xs: statistics.median(xs)
    return {
        "concurrency": runs[0].concurrency, "requests": runs[0].requests, "repeats": len(runs),
        "throughput_tok_s": med([r.throughput for r in runs]),
        "ttft_p50_s": med([pct(r.ttft_s, 0.5) for r in runs]), "ttft_p99_s": med([pct(r.ttft_s, 0.99) for r in runs]),
        "latency_p50_s": med([pct(r.latency_s, 0.5) for r in runs]),
        "latency_p99_s": med([pct(r.latency_s, 0.99) for r in runs]),
        "tokens": [r.tokens for r in runs], "wall_s": [r.wall_s for r in runs],
        "errors": sum(r.errors for r in runs),
        "runs": [asdict(r) for r in runs],
    }


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    for res in results:
        cs = [lv["concurrency"] for lv in res["levels"]]
        axes[0].plot(cs, [lv["throughput_tok_s"] for lv in res["levels"]], marker="o", label=res["server"])
        axes[1].plot(cs, [lv["ttft_p50_s"] * 1e3 for lv in res["levels"]], marker="o", label=f"{res['server']} p50")
        axes[1].plot(cs, [lv["ttft_p99_s"] * 1e3 for lv in res["levels"]], marker="x", ls="--",
                     label=f"{res['server']} p99")
        axes[2].plot(cs, [lv["latency_p50_s"] for lv in res["levels"]], marker="o", label=f"{res['server']} p50")
    for ax, title in zip(axes, ["throughput (tok/s)", "time to first token (ms)", "request latency p50 (s)"]):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrent clients")
        ax.set_title(title)
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m", help="known model name or GGUF path")
    p.add_argument("--concurrency", default="1,8,32")
    p.add_argument("--requests", type=int, default=32, help="requests per load run")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--ctx", type=int, default=2048)
    p.add_argument("--peers", default="llamacpp", help="comma list: llamacpp, or empty")
    args = p.parse_args()
    args.concurrency = [int(c) for c in args.concurrency.split(",")]
    sys.path.insert(0, str(ROOT))
    from mixserve.hub import resolve_model

    model_path = str(resolve_model(args.model))
    RESULTS.mkdir(parents=True, exist_ok=True)
    servers = ["mixserve"] + [s for s in args.peers.split(",") if s]
    print(f"model {model_path}; {args.requests} requests x {args.max_tokens} tokens per run; "
          f"medians of {args.repeats}")
    results = [bench_server(name, args, model_path) for name in servers]
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out = RESULTS / f"server_{stamp}.json"
    out.write_text(json.dumps({"command": " ".join(sys.argv), "args": vars(args), "results": results}, indent=1))
    plot(results, out.with_suffix(".png"))
    print_table(results)
    print(f"wrote {out} and {out.with_suffix('.png')}")
    return 0


def print_table(results: list[dict]) -> None:
    print("\n| server | C | tok/s | TTFT p50 ms | TTFT p99 ms | latency p50 s | latency p99 s | errors |")
    print("|---|---|---|---|---|---|---|---|")
    for res in results:
        for lv in res["levels"]:
            print(f"| {res['server']} | {lv['concurrency']} | {lv['throughput_tok_s']:.1f} | "
                  f"{lv['ttft_p50_s']*1e3:.0f} | {lv['ttft_p99_s']*1e3:.0f} | {lv['latency_p50_s']:.2f} | "
                  f"{lv['latency_p99_s']:.2f} | "
                  f"{lv['errors']} |")
    if len(results) > 1:
        base = {lv["concurrency"]: lv["throughput_tok_s"] for lv in results[1]["levels"]}
        for lv in results[0]["levels"]:
            c = lv["concurrency"]
            if base.get(c):
                print(f"mixserve / {results[1]['server']} throughput at C={c}: {lv['throughput_tok_s'] / base[c]:.2f}x")


if __name__ == "__main__":
    sys.exit(main())
