"""Shared harness of the peer drivers: arguments, timing budget, medians, the JSON they print.

Standard library only: each driver runs under its own peer venv (`.peers/<peer>/bin/python`), and
`bench_engine.py` imports this module too for the mixserve side, so every engine is measured by the same
code. The measured quantities, for one prompt and `max_tokens` generated tokens per sample (EOS ignored):

- single stream: `ttft_s` = prompt string in -> first generated token out (tokenization and prefill
  included); `decode_tok_s` = (tokens - 1) / (time of last token - time of first token).
- aggregate for n samples of the prompt: `tok_s` = n * max_tokens / wall time of the whole call.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

RESULT_MARKER = "@@BENCH_RESULT@@"
"""Prefix of the one stdout line that carries the driver's JSON (engines print their own logs too)."""

DEFAULT_PROMPT = (
    "You are a helpful assistant. Write a short story about a small robot who learns to paint, "
    "in simple words, with a beginning, a middle and an end.\n\nStory:"
)


def parse_args(description: str, argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--model", required=True, help="GGUF file (llama.cpp) or HF folder (vLLM, transformers)")
    p.add_argument("--prompt", default=DEFAULT_PROMPT)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--n", default="1,4,16,64", help="comma-separated sample counts for the aggregate runs")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default=None, help="weights dtype where the engine has a choice")
    p.add_argument("--max-run-s", type=float, default=180.0,
                   help="skip an aggregate config whose one run is predicted to take longer")
    p.add_argument("--max-config-s", type=float, default=420.0,
                   help="stop repeating a config once its runs would exceed this (>= 1 run always)")
    p.add_argument("--warmup-tokens", type=int, default=16)
    p.add_argument("--out", default=None, help="also write the JSON here")
    args = p.parse_args(argv)
    args.n_list = sorted({int(x) for x in str(args.n).split(",") if x.strip()})
    return args


@dataclass
class Budget:
    """Keeps one engine's timed runs bounded: a config is skipped or repeated fewer times, and says so."""

    max_run_s: float
    max_config_s: float

    def repeat(self, run: Callable[[], dict[str, Any]], repeats: int) -> list[dict[str, Any]]:
        """Call `run` up to `repeats` times; stop early when one more run would overrun max_config_s."""
        runs: list[dict[str, Any]] = []
        start = time.perf_counter()
        for _ in range(max(1, repeats)):
            t0 = time.perf_counter()
            runs.append(run())
            last = time.perf_counter() - t0
            if len(runs) < repeats and time.perf_counter() - start + last > self.max_config_s:
                break
        return runs


def median_of(runs: list[dict[str, Any]], key: str) -> float | None:
    values = [r[key] for r in runs if r.get(key) is not None]
    return statistics.median(values) if values else None


def single_run(t_start: float, token_times: list[float]) -> dict[str, Any]:
    """One streamed sample -> its TTFT and decode rate (token_times: perf_counter at each new token)."""
    num = len(token_times)
    decode_s = token_times[-1] - token_times[0] if num > 1 else 0.0
    return {
        "num_tokens": num,
        "ttft_s": token_times[0] - t_start,
        "decode_s": decode_s,
        "decode_tok_s": (num - 1) / decode_s if decode_s > 0 else None,
        "wall_s": token_times[-1] - t_start,
    }


def summarize_single(runs: list[dict[str, Any]], repeats: int) -> dict[str, Any]:
    return {
        "ttft_s": median_of(runs, "ttft_s"),
        "decode_tok_s": median_of(runs, "decode_tok_s"),
        "num_runs": len(runs),
        "complete": len(runs) >= repeats,
        "runs": runs,
    }


def aggregate_run(n: int, num_tokens: int, wall_s: float) -> dict[str, Any]:
    return {"n": n, "num_tokens": num_tokens, "wall_s": wall_s, "tok_s": num_tokens / wall_s}


def sweep(
    n_list: list[int],
    run_n: Callable[[int], dict[str, Any]],
    args: argparse.Namespace,
    budget: Budget,
    rate_hint: float | None,
) -> dict[str, Any]:
    """Aggregate runs for each n, smallest first; a config predicted to overrun max_run_s is skipped.

    The smallest n always runs (at least once). The prediction for the others uses the best aggregate
    rate measured so far (or `rate_hint`, tok/s), which is conservative because aggregate throughput does
    not fall as n grows.
    """
    out: dict[str, Any] = {}
    best_rate = rate_hint
    for n in n_list:
        if best_rate and n != n_list[0]:
            predicted = n * args.max_tokens / best_rate
            if predicted > budget.max_run_s:
                out[str(n)] = {"skipped": f"predicted {predicted:.0f} s per run > --max-run-s {budget.max_run_s:.0f}"}
                log(f"n={n}: skipped (predicted {predicted:.0f} s per run)")
                continue
        try:
            runs = budget.repeat(lambda n=n: run_n(n), args.repeats)
        except Exception as exc:  # an engine failing at one n (e.g. out of KV space) still reports the others
            out[str(n)] = {"error": f"{type(exc).__name__}: {exc}"}
            log(f"n={n}: error {exc}")
            continue
        tok_s = median_of(runs, "tok_s")
        out[str(n)] = {"tok_s": tok_s, "num_runs": len(runs), "complete": len(runs) >= args.repeats, "runs": runs}
        log(f"n={n}: {tok_s:.1f} tok/s (median of {len(runs)})")
        if tok_s and (best_rate is None or tok_s > best_rate):
            best_rate = tok_s
    return out


def log(msg: str) -> None:
    print(f"[driver {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def emit(result: dict[str, Any], args: argparse.Namespace) -> None:
    text = json.dumps(result)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    print(RESULT_MARKER + text, flush=True)


def base_result(engine: str, version: str, args: argparse.Namespace) -> dict[str, Any]:
    return {
        "engine": engine,
        "version": version,
        "model": args.model,
        "threads": args.threads,
        "max_tokens": args.max_tokens,
        "temperature": args.temperature,
        "repeats": args.repeats,
        "n_list": args.n_list,
        "notes": [],
    }
