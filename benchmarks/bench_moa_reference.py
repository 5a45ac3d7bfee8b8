"""Mixture-of-Agents reference orchestration (its public recipe) driven through our OpenAI endpoint, versus
our native mixture served as `mixture/<name>` by the same server: accuracy and wall time (issue 11).

    PYTHONPATH=. .venv/bin/python benchmarks/bench_moa_reference.py --models smollm2-135m --specialists \\
        --profiles benchmarks/results/mixture_<stamp>.json --per-task 2 --max-tokens 32

One `mixserve serve` on 127.0.0.1 holds the pool (every model) and the mixture. The reference follows
MoA's public recipe (togethercomputer/MoA, `bot.py`/`utils.py`): layer 1, every proposer answers the user
question; each later layer and the final aggregator get MoA's aggregate-and-synthesize system prompt with
the previous layer's numbered responses, plus the user question; proposers of a layer run concurrently,
all through the official `openai` client. The native mixture gets the same questions concurrently (the
server batches them, groups by recruited model, aggregates). Both are graded by the task verifiers.
Writes `results/moa_reference_<stamp>.json`.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).parent / "results"
SPECIALISTS = Path.home() / ".cache" / "mixserve" / "specialists"

# MoA's aggregate-and-synthesize system prompt (togethercomputer/MoA, utils.py), verbatim.
MOA_SYSTEM = """You have been provided with a set of responses from various open-source models to the latest \
user query. Your task is to synthesize these responses into a single, high-quality response. It is crucial \
to critically evaluate the information provided in these responses, recognizing that some of it may be \
biased or incorrect. Your response should not simply replicate the given answers but should offer a refined, \
accurate, and comprehensive reply to the instruction. Ensure your response is well-structured, coherent, \
and adheres to the highest standards of accuracy and reliability.

Responses from models:"""


def moa_messages(question: str, previous: list[str]) -> list[dict[str, str]]:
    if not previous:
        return [{"role": "user", "content": question}]
    system = MOA_SYSTEM + "".join(f"\n{i}. {r}" for i, r in enumerate(previous, 1))
    return [{"role": "system", "content": system}, {"role": "user", "content": question}]


def moa_reference(client: Any, question: str, proposers: list[str], aggregator: str, layers: int,
                  max_tokens: int, pool: ThreadPoolExecutor, temperature: float = 0.7) -> str:
    def ask(model: str, messages: list[dict[str, str]]) -> str:
        out = client.chat.completions.create(model=model, messages=messages, max_tokens=max_tokens,
                                             temperature=temperature)
        return out.choices[0].message.content or ""

    previous: list[str] = []
    for _ in range(layers):
        msgs = moa_messages(question, previous)
        previous = list(pool.map(lambda m, msgs=msgs: ask(m, msgs), proposers))
    return ask(aggregator, moa_messages(question, previous))


def start_server(models: list[str], profiles: Path, max_tokens: int, log: Path, temperature: float = 0.7,
                 aggregation: str = "aggregator", budget: str = "4GiB", keyword_prompt: str = "shots"
                 ) -> tuple[subprocess.Popen[bytes], str]:
    import httpx

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = int(sock.getsockname()[1])
    cmd = [sys.executable, "-m", "mixserve", "serve", *[a for m in models for a in ("--model", m)],
           "--pool-memory-budget", budget, "--mixture", f"native={profiles}", "--mixture-max-tokens",
           str(max_tokens), "--mixture-temperature", str(temperature), "--mixture-aggregation", aggregation,
           "--mixture-keyword-prompt", keyword_prompt,
           "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning"]
    with open(log, "wb") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            time.sleep(1)
    proc.kill()
    raise RuntimeError(f"server did not start; see {log}")


def main() -> None:
    import openai

    from mixserve.mixture.grading import TaskGrader, mixed_problems, questions_from

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="smollm2-135m", help="comma list: name, path or name=path")
    ap.add_argument("--specialists", action="store_true", help="add build_specialists.py's folders")
    ap.add_argument("--profiles", required=True, help="profiles JSON, or a bench_mixture results JSON")
    ap.add_argument("--tasks", default="arithmetic,sorting,gcd")
    ap.add_argument("--per-task", type=int, default=2)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--moa-layers", type=int, default=2, help="proposer layers before the aggregator")
    ap.add_argument("--aggregator", default=None, help="MoA aggregator (default: the profiles' aggregator)")
    ap.add_argument("--temperature", type=float, default=0.7,
                    help="every call of both (MoA's recipe and the paper: 0.7; 0: greedy)")
    ap.add_argument("--aggregation", default="aggregator", choices=["aggregator", "skip-on-agreement", "majority"],
                    help="the native mixture's final step (serve --mixture-aggregation)")
    ap.add_argument("--pool-memory-budget", default="4GiB")
    ap.add_argument("--keyword-prompt", default="shots", choices=["shots", "paper", "generic-shots"],
                    help="the native mixture's keyword prompt (serve --mixture-keyword-prompt)")
    ap.add_argument("--request-timeout", type=float, default=900, help="seconds per OpenAI call")
    ap.add_argument("--warm", action="store_true",
                    help="load every model (POST /v1/models/load) before timing, so neither side pays cold loads")
    args = ap.parse_args()
    tasks = args.tasks.split(",")
    models = [m for m in args.models.split(",") if m]
    if args.specialists:
        models += [f"spec-{t}={SPECIALISTS / f'smollm2-135m-{t}'}" for t in tasks]
    names = [m.partition("=")[0] if "=" in m else m for m in models]
    data = json.loads(Path(args.profiles).read_text())
    profiles = data["profile"]["profiles"] if "profile" in data else data
    aggregator = args.aggregator or profiles.get("aggregator") or names[0]
    questions = questions_from(mixed_problems(tasks, args.per_task, seed=0, difficulty=1))
    grader = TaskGrader()
    RESULTS.mkdir(exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out: dict[str, Any] = {"args": vars(args), "models": models, "aggregator": aggregator,
                           "note": "loaded machine (shared 2-core CPU)"}
    with tempfile.TemporaryDirectory() as tmp:
        prof_path = Path(tmp) / "profiles.json"
        prof_path.write_text(json.dumps(profiles))
        log = Path(tmp) / "server.log"
        proc, url = start_server(models, prof_path, args.max_tokens, log, args.temperature, args.aggregation,
                                 args.pool_memory_budget, args.keyword_prompt)
        try:
            if args.warm:
                import httpx

                t0 = time.perf_counter()
                for name in names:
                    r = httpx.post(f"{url}/v1/models/load", json={"model": name}, timeout=600)
                    r.raise_for_status()
                out["warm_load_s"] = time.perf_counter() - t0
            client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", timeout=args.request_timeout,
                                   max_retries=0)
            with ThreadPoolExecutor(16) as pool:
                for name, one in (
                        ("moa-reference", lambda q: moa_reference(client, q.text, names, aggregator, args.moa_layers,
                                                                  args.max_tokens, pool, args.temperature)),
                        ("native-mixture", lambda q: client.chat.completions.create(
                            model="mixture/native", messages=[{"role": "user", "content": q.text}],
                        ).choices[0].message.content or "")):
                    t0 = time.perf_counter()
                    with ThreadPoolExecutor(len(questions)) as outer:
                        finals = list(outer.map(one, questions))
                    wall = time.perf_counter() - t0
                    right = [grader.right(q, f) for q, f in zip(questions, finals, strict=True)]
                    out[name] = {"accuracy": sum(right) / len(right), "wall_s": wall, "finals": finals}
                    print(f"{name:<16} acc {out[name]['accuracy']:.3f}  wall {wall:7.1f}s", flush=True)
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=30)
            out["server_log_tail"] = log.read_text(errors="replace")[-4000:]
    path = RESULTS / f"moa_reference_{stamp}.json"
    path.write_text(json.dumps(out, indent=1))
    print(f"-> {path}")


if __name__ == "__main__":
    main()
