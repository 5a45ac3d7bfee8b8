"""Peer comparison: self-consistency and best-of-N at N = 16, driven (a) by an external orchestrator
through mixserve's OpenAI endpoint (a plain async OpenAI client issuing N requests per question, and
N judge requests that re-send the whole conversation, the way its_hub-style libraries do), versus
(b) mixserve's native path (samples forked from one prefill, judges forked from each sample's KV).

    .venv/bin/python benchmarks/bench_scaling_peer.py                   # starts `mixserve serve` itself
    .venv/bin/python benchmarks/bench_scaling_peer.py --num-problems 4 --budget 8 --max-tokens 48

The native path goes through the same server with the `strategy`/`budget`/`verifier` request fields
when the server accepts them, else in this process via `LLM.scale` (same model, same settings; the
JSON says which). Reports wall time, prompt tokens prefilled (prompt_tokens - cached_tokens, from the
server's usage) and accuracy on generated arithmetic problems; writes benchmarks/results/scaling_peer_<stamp>.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import socket
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
from openai import AsyncOpenAI, BadRequestError

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).resolve().parent / "results"
sys.path.insert(0, str(ROOT))

from mixserve.scaling.judge import QUESTION  # noqa: E402
from mixserve.scaling.tasks import get_task  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_server(args: argparse.Namespace, port: int) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "mixserve", "serve", "--model", args.model, "--port", str(port),
           "--threads", str(args.threads), "--max-num-seqs", "256"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 300
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"mixserve serve exited: {proc.stderr.read().decode()[-2000:] if proc.stderr else ''}")
        try:
            probe = httpx.post(f"http://127.0.0.1:{port}/v1/completions", timeout=30,
                               json={"model": args.model, "prompt": "hi", "max_tokens": 1})
            if probe.status_code == 200:  # 503 while the model is still loading
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(1)
    proc.kill()
    raise RuntimeError("mixserve serve did not come up in 300 s")


class Tally:
    def __init__(self) -> None:
        self.prompt = self.cached = self.completion = 0

    def add(self, usage: Any) -> None:
        self.prompt += usage.prompt_tokens
        self.completion += usage.completion_tokens
        details = getattr(usage, "prompt_tokens_details", None)
        self.cached += (getattr(details, "cached_tokens", 0) or 0) if details else 0


async def external(client: AsyncOpenAI, model: str, question: str, n: int, judge: bool, args: argparse.Namespace,
                   tally: Tally) -> list[tuple[str, float]]:
    """N independent requests (+ N judge requests re-sending the conversation): (text, score) each."""
    messages = [{"role": "user", "content": question}]

    async def one(i: int) -> tuple[str, float]:
        r = await client.chat.completions.create(model=model, messages=messages, temperature=args.temperature,
                                                 max_tokens=args.max_tokens, seed=args.seed + i)
        tally.add(r.usage)
        text = r.choices[0].message.content or ""
        if not judge:
            return text, 0.0
        j = await client.chat.completions.create(
            model=model, messages=messages + [{"role": "assistant", "content": text},
                                              {"role": "user", "content": QUESTION}],
            max_tokens=1, temperature=0, logprobs=True, top_logprobs=20)
        tally.add(j.usage)
        top = j.choices[0].logprobs.content[0].top_logprobs if j.choices[0].logprobs else []
        p = {t.token.strip().lower(): 0.0 for t in top}
        for t in top:
            p[t.token.strip().lower()] += math.exp(t.logprob)
        yes, no = p.get("yes", 0.0), p.get("no", 0.0)
        return text, yes / (yes + no) if yes + no else 0.5

    return list(await asyncio.gather(*(one(i) for i in range(n))))


def select(name: str, scored: list[tuple[str, float]], extract: Any) -> str | None:
    answers = [(extract(t), s) for t, s in scored]
    if name == "majority":
        counts = Counter(a for a, _ in answers if a is not None)
        return counts.most_common(1)[0][0] if counts else None
    return max(answers, key=lambda a: a[1])[0]


async def run_external(args: argparse.Namespace, port: int, name: str, problems: list, task: Any) -> dict:
    client = AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", timeout=3600)
    tally = Tally()
    start = time.perf_counter()
    outs = await asyncio.gather(*(external(client, args.model, p.question, args.budget, name == "bon", args, tally)
                                  for p in problems))
    wall = time.perf_counter() - start
    correct = sum(task.check(p, select(name, o, task.extract)) for p, o in zip(problems, outs, strict=True))
    return {"path": "external (async OpenAI client, N requests)", "strategy": name, "wall_s": wall,
            "accuracy": correct / len(problems), "prompt_tokens": tally.prompt,
            "prefilled_tokens": tally.prompt - tally.cached, "completion_tokens": tally.completion}


def metric(port: int, name: str) -> float:
    """Sum of a counter over its labels from the server's /metrics."""
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=30).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.split("{")[0].split(" ")[0] == f"mixserve:{name}")


SERVER_COUNTERS = ("prompt_tokens_admitted_total", "prompt_tokens_prefilled_total", "generation_tokens_total")


async def with_server_counters(port: int, run: Any) -> dict:
    """Run one path and add what the server's counters saw during it (`server_<counter>`)."""
    before = {k: metric(port, k) for k in SERVER_COUNTERS}
    row = await run
    row.update({f"server_{k}": int(metric(port, k) - v) for k, v in before.items()})
    return row


async def run_itshub(args: argparse.Namespace, port: int, name: str, problems: list, task: Any) -> dict:
    """its_hub's SelfConsistency / BestOfN in its own venv against the same server (see peers/itshub_scaling.py)."""
    python = ROOT / ".peers" / "itshub" / "bin" / "python"
    if not python.exists():
        raise FileNotFoundError(f"{python} missing: run `bash benchmarks/setup_peers.sh itshub`")
    qfile = RESULTS / f"itshub_problems_{port}.json"
    qfile.write_text(json.dumps([{"question": p.question} for p in problems]))
    cmd = [str(python), str(ROOT / "benchmarks" / "peers" / "itshub_scaling.py"), "--port", str(port),
           "--model", args.model, "--task", args.task, "--strategy", name, "--budget", str(args.budget),
           "--max-tokens", str(args.max_tokens), "--temperature", str(args.temperature), "--problems", str(qfile)]
    proc = await asyncio.create_subprocess_exec(*cmd, cwd=ROOT, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await proc.communicate()
    qfile.unlink()
    if proc.returncode != 0:
        raise RuntimeError(f"its_hub run failed:\n{err.decode()[-3000:]}")
    res = json.loads(out.decode().strip().splitlines()[-1])
    correct = sum(task.check(p, task.extract(t)) for p, t in zip(problems, res["texts"], strict=True))
    return {"path": "its_hub 1.2.0 (SelfConsistency / BestOfN over the endpoint)", "strategy": name,
            "wall_s": res["wall_s"], "accuracy": correct / len(problems), "prompt_tokens": 0, "prefilled_tokens": 0,
            "completion_tokens": 0}  # filled from the server's counters (with_server_counters)


async def run_native_server(args: argparse.Namespace, port: int, name: str, problems: list, task: Any) -> dict:
    client = AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", timeout=3600)
    extra = {"strategy": name, "budget": args.budget, "extractor": args.extractor,
             **({"verifier": "judge"} if name == "bon" else {})}
    tally = Tally()
    usages: list[Any] = []
    start = time.perf_counter()

    async def one(p: Any) -> str:
        r = await client.chat.completions.create(model=args.model, messages=[{"role": "user", "content": p.question}],
                                                 temperature=args.temperature, max_tokens=args.max_tokens,
                                                 seed=args.seed, extra_body=extra)
        tally.add(r.usage)
        usages.append(r.usage.model_dump() if r.usage else {})
        return r.choices[0].message.content or ""

    texts = await asyncio.gather(*(one(p) for p in problems))
    wall = time.perf_counter() - start
    correct = sum(task.check(p, task.extract(t)) for p, t in zip(problems, texts, strict=True))
    return {"path": "native (server strategy field)", "strategy": name, "wall_s": wall,
            "accuracy": correct / len(problems), "prompt_tokens": tally.prompt,
            "prefilled_tokens": tally.prompt - tally.cached, "completion_tokens": tally.completion,
            "usage_example": usages[0] if usages else {}}


def run_native_inprocess(args: argparse.Namespace, name: str, problems: list, task: Any) -> dict:
    from mixserve import LLM, SamplingParams
    from mixserve.scaling import ScaleConfig, make_strategy, run_strategies

    llm = LLM(args.model, num_threads=args.threads, max_num_seqs=256)
    params = SamplingParams(temperature=args.temperature, max_tokens=args.max_tokens, seed=args.seed)
    config = ScaleConfig(budget=args.budget, params=params)
    start = time.perf_counter()
    made = [make_strategy(name, llm.tokenizer.encode_chat([{"role": "user", "content": p.question}]),
                          verifier="judge" if name == "bon" else None, tokenizer=llm.tokenizer, config=config,
                          extract=task.extract, strategy_id=f"peer-{name}-{i}") for i, p in enumerate(problems)]
    results = run_strategies(llm.engine, made)
    wall = time.perf_counter() - start
    u = [r.usage for r in results]
    return {"path": "native (in-process LLM/strategies; server lacks the strategy field)", "strategy": name,
            "wall_s": wall, "accuracy": sum(task.check(p, r.answer) for p, r in zip(problems, results, strict=True))
            / len(problems), "prompt_tokens": sum(x.policy_prompt_tokens + x.verifier_prompt_tokens for x in u),
            "prefilled_tokens": sum(x.policy_prefill_tokens + x.verifier_prefill_tokens for x in u),
            "completion_tokens": sum(x.total_generated_tokens for x in u)}


async def main_async(args: argparse.Namespace) -> list[dict]:
    task = get_task(args.task)
    problems = task.generate(args.num_problems, args.seed, args.difficulty)
    port = free_port()
    proc = start_server(args, port)
    rows = []
    try:
        for name in args.strategies.split(","):
            if "itshub" in args.peers:
                rows.append(await with_server_counters(port, run_itshub(args, port, name, problems, task)))
            if "client" in args.peers:
                rows.append(await with_server_counters(port, run_external(args, port, name, problems, task)))
            try:
                rows.append(await with_server_counters(port, run_native_server(args, port, name, problems, task)))
            except BadRequestError as exc:
                print(f"[bench] server rejected the strategy field ({exc}); native path runs in-process")
                rows.append({"deferred": name})
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    return [run_native_inprocess(args, r["deferred"], problems, task) if "deferred" in r else r for r in rows]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--task", default="arithmetic")
    p.add_argument("--difficulty", type=int, default=1)
    p.add_argument("--num-problems", type=int, default=8)
    p.add_argument("--budget", type=int, default=16)
    p.add_argument("--strategies", default="majority,bon")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--extractor", default="number",
                   help="the native path's answer extractor (the external paths vote with the task's own)")
    p.add_argument("--peers", default="itshub,client",
                   help="external orchestrators to run: itshub (its_hub in .peers/itshub), client (plain async OpenAI)")
    args = p.parse_args()
    rows = asyncio.run(main_async(args))
    for r in rows:  # its_hub reports no usage: its plain requests are what the server's counters saw
        if r["path"].startswith("its_hub"):
            r["prompt_tokens"] = r["server_prompt_tokens_admitted_total"]
            r["prefilled_tokens"] = r["server_prompt_tokens_prefilled_total"]
            r["completion_tokens"] = r["server_generation_tokens_total"]
    print(f"{'strategy':<9} {'path':<60} {'wall_s':>8} {'acc':>5} {'prompt':>8} {'prefilled':>9} {'gen':>7}")
    for r in rows:
        print(f"{r['strategy']:<9} {r['path']:<60} {r['wall_s']:>8.1f} {r['accuracy']:>5.2f} "
              f"{r['prompt_tokens']:>8} {r['prefilled_tokens']:>9} {r['completion_tokens']:>7}")
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"scaling_peer_{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2))
    print(f"[bench] wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
