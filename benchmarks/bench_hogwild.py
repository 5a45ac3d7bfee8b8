"""Hogwild! inference on the embedded models: speed per worker count, and accuracy on the task suite.

Speed: for W = 1, 2, 4 workers, the time of one pass of the step loop (one token per worker, one
batch) and tokens/s, medians over repeats, next to plain single-stream decode of the same model
(`LLM.generate`, per-token time from max_tokens T vs 1).
Accuracy: on a generated task (`mixserve eval` tasks), with T tokens per worker: one sample
(majority budget 1), hogwild W = 2, 4 (T passes: about one sample's wall-clock), and independent
sampling + majority with W samples of T tokens (the same tokens as hogwild W). Seconds are reported
per row. Writes results.json, a PNG, and example transcripts.

    PYTHONPATH=. python benchmarks/bench_hogwild.py --models smollm2-135m gemma3-270m
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

from mixserve import LLM, SamplingParams
from mixserve.scaling.evaluate import EvalConfig, run_cell

QUESTION = "A shop sells pens at 3 dollars each. Tom buys 7 pens and pays with a 50 dollar note. How much change?"


def decode_seconds(llm: LLM, prompt: str, tokens: int) -> float:
    """Per-token time of plain single-stream decode (median of 3)."""
    ids = llm.encode(prompt)
    times = []
    for _ in range(3):
        spans = []
        for n in (1, tokens):
            params = SamplingParams(temperature=0.7, max_tokens=n, ignore_eos=True, seed=0)
            start = time.perf_counter()
            llm.generate(ids, params)
            spans.append(time.perf_counter() - start)
        times.append((spans[1] - spans[0]) / (tokens - 1))
    return statistics.median(times)


def speed(llm: LLM, passes: int, repeats: int) -> list[dict[str, Any]]:
    llm.hogwild(QUESTION, workers=2, max_tokens=8)  # warm-up (first-call kernel set-up)
    rows = []
    plain = decode_seconds(llm, QUESTION, passes)
    rows.append({"mode": "plain decode", "workers": 1, "pass_ms": plain * 1e3, "tokens_per_s": 1 / plain})
    for workers in (1, 2, 4):
        medians = []
        for i in range(repeats):
            r = llm.hogwild(QUESTION, workers=workers, max_tokens=passes, stop_on_answer=False,
                            finisher_max_tokens=0, params=SamplingParams(temperature=0.7, seed=i))
            medians.append(statistics.median(r.pass_seconds[1:]))  # pass 0 samples the prefill's logits
        ms = statistics.median(medians)
        rows.append({"mode": "hogwild", "workers": workers, "pass_ms": ms * 1e3, "tokens_per_s": workers / ms})
    return rows


def accuracy(llm: LLM, task: str, problems: int, tokens: int, seed: int) -> tuple[list[dict[str, Any]], list[Any]]:
    config = EvalConfig(task=task, strategies=("majority", "hogwild"), budgets=(1,), num_problems=problems,
                        max_tokens=tokens, temperature=0.7, seed=seed)
    cells = [("majority", 1), ("hogwild", 2), ("majority", 2), ("hogwild", 4), ("majority", 4)]
    rows = []
    for strategy, budget in cells:
        row = run_cell(llm.engine, llm.tokenizer, config, strategy, budget, llm.cost())
        rows.append({k: row[k] for k in ("strategy", "budget", "accuracy", "seconds", "generated_tokens",
                                         "prefill_tokens")})
        print(f"  {strategy:9s} W={budget}: acc {row['accuracy']:.2f}  {row['seconds']:.1f}s  "
              f"{row['generated_tokens']:.0f} tok/problem", flush=True)
    from mixserve.scaling.tasks import get_task

    p = get_task(task).generate(1, seed, 1)[0]
    ids = list(llm.tokenizer.encode_chat([{"role": "user", "content": p.question}])) \
        if not llm.tokenizer.chat_template_is_default else llm.encode(p.question + "\n")
    example = llm.hogwild(ids, workers=2, max_tokens=tokens, params=SamplingParams(temperature=0.7, seed=seed))
    return rows, [{"question": p.question, "expected": p.reference, "answer": example.answer,
                   "transcript": example.transcript, "answer_text": example.answer_text}]


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for model, res in results.items():
        hog = [r for r in res["speed"] if r["mode"] == "hogwild"]
        axes[0].plot([r["workers"] for r in hog], [r["tokens_per_s"] for r in hog], "o-", label=f"{model} hogwild")
        plain = next(r for r in res["speed"] if r["mode"] == "plain decode")
        axes[0].axhline(plain["tokens_per_s"], ls="--", color=axes[0].lines[-1].get_color(),
                        label=f"{model} plain decode")
        labels = [f"{r['strategy'][:3]} {r['budget']}" for r in res["accuracy"]]
        axes[1].bar([f"{model[:6]}\n{x}" for x in labels], [r["accuracy"] for r in res["accuracy"]])
    axes[0].set_xlabel("workers")
    axes[0].set_ylabel("tokens/s (all workers)")
    axes[0].legend(fontsize=7)
    axes[1].set_ylabel("accuracy")
    axes[1].tick_params(axis="x", labelsize=6)
    fig.suptitle("Hogwild! on CPU (measured while other work shared the machine)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["smollm2-135m", "gemma3-270m"])
    ap.add_argument("--passes", type=int, default=64, help="passes per speed run")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--task", default="arithmetic")
    ap.add_argument("--problems", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=128, help="tokens per worker / per sample")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="benchmarks/results/hogwild")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {}
    for model in args.models:
        llm = LLM(model, max_model_len=4096)
        print(f"== {model}", flush=True)
        rows = speed(llm, args.passes, args.repeats)
        for r in rows:
            print(f"  {r['mode']:12s} W={r['workers']}: {r['pass_ms']:7.1f} ms/pass  {r['tokens_per_s']:6.1f} tok/s",
                  flush=True)
        acc, examples = accuracy(llm, args.task, args.problems, args.tokens, args.seed)
        results[model] = {"speed": rows, "accuracy": acc, "examples": examples}
        (out / "results.json").write_text(json.dumps({"args": vars(args), "results": results}, indent=2))
    plot(results, out / "hogwild.png")
    print(f"wrote {out / 'results.json'} and {out / 'hogwild.png'}")


if __name__ == "__main__":
    main()
