"""Scale-out on Ray, measured on loopback with the real `mixserve serve` processes, one at a time.

1. Throughput and p50/p99 TTFT: single-process server (--threads 2) vs `--ray --replicas 1` vs
   `--ray --replicas 2` (1 thread per replica), streamed completions from C concurrent clients.
2. Prefix-aware vs round-robin routing (2 replicas) on a shared-prefix chat workload (--docs long system
   prompts, each shared by --users / --docs users, --turns turns each): prefix-cache hit rate (hit blocks /
   looked-up blocks, summed over the replicas' metrics) and TTFT.
3. Failover: a replica is SIGKILLed while greedy streams run; the longest stall a client saw, the
   ingress's resume pause (death detected -> first resumed token), tokens lost (max_tokens minus the
   completion tokens the client got: must be 0) and how many streams equal an undisturbed run at the
   same concurrency (the quantized model's logits are not bitwise batch-invariant, and a resumed
   request recomputes its KV in one prefill, so a near-tie may flip; on fp32 test models they are equal).
4. Live migration pause: a running stream is moved (`POST /v1/cluster/migrate`); the ingress reports
   the time from stopping the old leg to the first token of the new one (KV recomputed on the target).

    .venv/bin/python benchmarks/bench_ray.py --repeats 3

Medians over --repeats load runs per server. Writes benchmarks/results/ray.json and ray.png.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_server import PROMPTS, free_port, pct, run_load, wait_healthy  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
SYSTEMS = [
    "You are a careful assistant for a travel agency. Answer questions about flights, hotels, visas and "
    "local customs. Keep answers short, list options as bullet points and always mention prices in euros.",
    "You are a patient maths tutor. Explain each step, use small numbers in examples, check the student's "
    "answer and never give the final result before the student tried. Reply in plain English sentences.",
]


class Running:
    def __init__(self, model: str, extra: list[str], log: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "mixserve", "serve", "--model", model, "--served-model-name", "m",
               "--port", str(self.port), "--log-level", "warning", "--kv-cache-gib", "0.25",
               "--max-model-len", "2048", *extra]
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        self.proc = subprocess.Popen(cmd, stdout=open(log, "wb"), stderr=subprocess.STDOUT, env=env,
                                     start_new_session=True)
        wait_healthy(self.url, self.proc, "/health", timeout_s=600)

    def stop(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(self.proc.pid, sig)
                self.proc.wait(40)
                time.sleep(1)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                pass


def prefix_hit_rate(url: str) -> float:
    hits = queries = 0.0
    for line in httpx.get(url + "/metrics", timeout=10).text.splitlines():
        if line.startswith("mixserve:prefix_cache_hits_total"):
            hits += float(line.rsplit(" ", 1)[1])
        elif line.startswith("mixserve:prefix_cache_queries_total"):
            queries += float(line.rsplit(" ", 1)[1])
    return hits / queries if queries else 0.0


def document(k: int) -> str:
    """A distinct long system prompt (~150 tokens) per k: a role plus a rotated set of reference notes."""
    notes = PROMPTS[k % len(PROMPTS):] + PROMPTS[:k % len(PROMPTS)]
    return f"Case file {k}. " + SYSTEMS[k % len(SYSTEMS)] + " Reference notes: " + " ".join(notes)


async def chat_load(url: str, num_users: int, turns: int, max_tokens: int, num_docs: int) -> list[float]:
    """Users (each on one of `num_docs` long shared system prompts) send `turns` turns each, concurrently."""
    ttfts: list[float] = []
    first_wave = asyncio.Event()
    pending = [num_docs]

    async def user(u: int, client: httpx.AsyncClient) -> None:
        if u >= num_docs:  # the first user of each document goes first: its blocks are then cached somewhere
            await first_wave.wait()
        messages = [{"role": "system", "content": document(u % num_docs)}]
        for t in range(turns):
            messages.append({"role": "user", "content": f"{PROMPTS[(u + t) % len(PROMPTS)]} (user {u})"})
            body = {"model": "m", "messages": messages, "max_tokens": max_tokens, "temperature": 0.0, "stream": True}
            start, first, text = time.perf_counter(), None, ""
            async with client.stream("POST", url + "/v1/chat/completions", json=body) as resp:
                async for line in resp.aiter_lines():
                    if line.startswith("data:") and "[DONE]" not in line:
                        delta = json.loads(line[5:])["choices"]
                        if delta and delta[0]["delta"].get("content"):
                            first = first or time.perf_counter()
                            text += delta[0]["delta"]["content"]
            ttfts.append((first or time.perf_counter()) - start)
            messages.append({"role": "assistant", "content": text})
            if u < num_docs and t == 0:
                pending[0] -= 1
                if not pending[0]:
                    first_wave.set()

    async with httpx.AsyncClient(timeout=600) as client:
        await asyncio.gather(*(user(u, client) for u in range(num_users)))
    return ttfts


async def stream_collect(url: str, prompt: str, max_tokens: int, marks: list[float], usage: list[int]) -> str:
    """Greedy streamed completion; appends its completion token count (usage) to `usage`."""
    body = {"model": "m", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0, "stream": True,
            "ignore_eos": True, "stream_options": {"include_usage": True}}
    text = ""
    async with httpx.AsyncClient(timeout=600) as client, \
            client.stream("POST", url + "/v1/completions", json=body) as resp:
        async for line in resp.aiter_lines():
            if line.startswith("data:") and "[DONE]" not in line:
                chunk = json.loads(line[5:])
                if "error" in chunk:
                    raise RuntimeError(chunk["error"])
                if chunk.get("choices"):
                    text += chunk["choices"][0]["text"]
                    marks.append(time.perf_counter())
                if chunk.get("usage"):
                    usage.append(chunk["usage"]["completion_tokens"])
    return text


async def interrupt(url: str, num_streams: int, max_tokens: int, action: str, kv: str | None = None,
                    after: int = 8) -> dict[str, Any]:
    """Greedy streams, run once undisturbed (the reference, same concurrency) and once with `action`
    (kill or migrate) hitting them after a few chunks. Tokens lost = max_tokens - completion tokens received."""
    async with httpx.AsyncClient(timeout=600) as client:
        wants = await asyncio.gather(*(stream_collect(url, PROMPTS[i], max_tokens, [], []) for i in range(num_streams)))
        marks: list[list[float]] = [[] for _ in range(num_streams)]
        usage: list[int] = []
        tasks = [asyncio.ensure_future(stream_collect(url, PROMPTS[i], max_tokens, marks[i], usage))
                 for i in range(num_streams)]
        while min(len(m) for m in marks) < after:
            await asyncio.sleep(0.01)
        hit_at = time.perf_counter()
        if action == "kill":
            flights = (await client.get(url + "/v1/cluster/requests")).json()["requests"]
            victim = flights[0]["replicas"][0]
            replicas = (await client.get(url + "/v1/cluster/replicas")).json()["replicas"]
            os.kill(next(r["pid"] for r in replicas if r["id"] == victim), signal.SIGKILL)
        else:
            for flight in (await client.get(url + "/v1/cluster/requests")).json()["requests"]:
                body = {"request_id": flight["id"]} if kv is None else {"request_id": flight["id"], "kv": kv}
                await client.post(url + "/v1/cluster/migrate", json=body)
        gots = await asyncio.gather(*tasks)
        status = (await client.get(url + "/v1/cluster/replicas")).json()
    stalls = [max((b - a for a, b in zip(m, m[1:]) if b > hit_at), default=0.0) for m in marks]
    return {"streams": num_streams, "identical_to_undisturbed": sum(w == g for w, g in zip(wants, gots)),
            "tokens_lost": num_streams * max_tokens - sum(usage), "max_client_stall_s": max(stalls),
            "resume_pause_s": status["failover_pauses_s" if action == "kill" else "migration_pauses_s"],
            "failovers": status["failovers"], "migrations": status["migrations"],
            "migrated_kv_tokens": status.get("migrated_kv_tokens"),
            "recomputed_tokens": status.get("recomputed_tokens")}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--requests", type=int, default=12)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--parts", default="throughput,routing", help="comma list: throughput (+failover and "
                    "migration), routing, kv (migration pause with KV blocks vs recompute, 2 replicas)")
    ap.add_argument("--docs", type=int, default=8)
    ap.add_argument("--users", type=int, default=24)
    ap.add_argument("--turns", type=int, default=2)
    args = ap.parse_args()
    RESULTS.mkdir(parents=True, exist_ok=True)
    logs = ROOT / "benchmarks" / "work" / "ray-logs"  # gitignored
    logs.mkdir(parents=True, exist_ok=True)
    out: dict[str, Any] = {"args": vars(args), "throughput": {}, "routing": {}}
    setups = {"single (2 threads)": ["--threads", "2"],
              "ray 1 replica x1 thread": ["--ray", "--replicas", "1", "--threads-per-replica", "1"],
              "ray 2 replicas x1 thread": ["--ray", "--replicas", "2", "--threads-per-replica", "1"]}
    parts = set(args.parts.split(","))
    for name, extra in setups.items() if "throughput" in parts else ():
        server = Running(args.model, extra, logs / f"{name.split()[0]}-{len(out['throughput'])}.log")
        try:
            asyncio.run(run_load(server.url, "m", 1, 2, 8))  # warm-up
            runs = [asyncio.run(run_load(server.url, "m", args.concurrency, args.requests, args.max_tokens))
                    for _ in range(args.repeats)]
            out["throughput"][name] = {
                "tok_s": statistics.median(r.throughput for r in runs),
                "ttft_p50_s": statistics.median(pct(r.ttft_s, 0.5) for r in runs),
                "ttft_p99_s": statistics.median(pct(r.ttft_s, 0.99) for r in runs),
                "errors": sum(r.errors for r in runs)}
            if name.startswith("ray 2"):
                out["failover"] = asyncio.run(interrupt(server.url, 2, 96, "kill"))
                time.sleep(2)
                wait_for_replicas(server.url, 2)
                out["migration"] = asyncio.run(interrupt(server.url, 2, 96, "migrate"))
        finally:
            server.stop()
        print(name, out["throughput"][name], flush=True)
    if "kv" in parts:
        out["kv_migration"] = migration_kv(args.model, logs)
    for routing in ("prefix", "round_robin") if "routing" in parts else ():
        server = Running(args.model, ["--ray", "--replicas", "2", "--routing", routing], logs / f"{routing}.log")
        try:
            ttfts = asyncio.run(chat_load(server.url, args.users, args.turns, 8, args.docs))
            routed = httpx.get(server.url + "/v1/cluster/replicas", timeout=10).json()["replicas"]
            out["routing"][routing] = {"hit_rate": prefix_hit_rate(server.url), "ttft_p50_s": pct(ttfts, 0.5),
                                       "ttft_p99_s": pct(ttfts, 0.99), "routed": {r["id"]: r["routed"] for r in routed}}
        finally:
            server.stop()
        print(routing, out["routing"][routing], flush=True)
    name = "ray.json" if parts == {"throughput", "routing"} else f"ray-{'-'.join(sorted(parts))}.json"
    (RESULTS / name).write_text(json.dumps(out, indent=2))
    report(out, RESULTS / name.replace(".json", ".png"))
    return 0


def migration_kv(model: str, logs: Path) -> dict[str, Any]:
    """2 replicas; greedy streams of 384 tokens migrated after 256 chunks, alternately with KV blocks and
    recomputing; counters are cumulative (read the differences)."""
    server = Running(model, ["--ray", "--replicas", "2"], logs / "kv.log")
    out: dict[str, Any] = {}
    try:
        asyncio.run(run_load(server.url, "m", 1, 2, 8))  # warm-up
        for kv in ("blocks", "recompute", "blocks", "recompute"):
            wait_for_replicas(server.url, 2)
            out.setdefault(kv, []).append(asyncio.run(interrupt(server.url, 2, 384, "migrate", kv=kv, after=256)))
            print(kv, out[kv][-1], flush=True)
    finally:
        server.stop()
    return out


def wait_for_replicas(url: str, n: int, timeout_s: float = 300) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        replicas = httpx.get(url + "/v1/cluster/replicas", timeout=10).json()["replicas"]
        if sum(r["state"] == "ready" for r in replicas) >= n:
            return
        time.sleep(0.5)


def report(out: dict[str, Any], png: Path) -> None:
    print(f"\n{'setup':<28} {'tok/s':>8} {'TTFT p50':>9} {'TTFT p99':>9} {'errors':>6}")
    for name, r in out["throughput"].items():
        print(f"{name:<28} {r['tok_s']:>8.1f} {r['ttft_p50_s']:>8.3f}s {r['ttft_p99_s']:>8.3f}s {r['errors']:>6}")
    print(f"\n{'routing':<14} {'hit rate':>8} {'TTFT p50':>9} {'TTFT p99':>9}")
    for name, r in out["routing"].items():
        print(f"{name:<14} {r['hit_rate']:>8.2f} {r['ttft_p50_s']:>8.3f}s {r['ttft_p99_s']:>8.3f}s")
    for key in ("failover", "migration"):
        if key in out:
            print(f"{key}: {out[key]}")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    names = list(out["throughput"])
    axes[0].bar(names, [out["throughput"][n]["tok_s"] for n in names])
    axes[0].set_ylabel("generated tok/s (median)")
    axes[0].tick_params(axis="x", labelsize=7)
    routes = list(out["routing"])
    axes[1].bar(routes, [out["routing"][r]["hit_rate"] for r in routes])
    axes[1].set_ylabel("prefix-cache hit rate")
    fig.suptitle("mixserve on Ray (measured while other work shared the machine)")
    fig.tight_layout()
    fig.savefig(png, dpi=100)


if __name__ == "__main__":
    sys.exit(main())
