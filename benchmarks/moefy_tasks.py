"""Task-suite accuracy of moefied models against their dense source (greedy, through mixserve's engine).

    PYTHONPATH=. .venv/bin/python benchmarks/moefy_tasks.py --models dense=smollm2-135m,e16k4=/work/i16/e16k4 \
        --per-task 30 --max-tokens 32 --threads 1

Every model answers the same held-out questions (seed 555, difficulty 1) of each task through its chat
template, greedy, `--max-tokens` tokens; accuracy = the task's own extractor and checker. All models run
with `--weight-format dense` (fp32), so the dense row is the same weights moefy started from (the GGUF's
4-bit blocks dequantized) and the only difference is the MoE split. Also reports, per moefied model, the
share of questions whose greedy answer text equals the dense model's. Writes
benchmarks/results/moefy_tasks_<stamp>.{json,png}.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from mixserve.llm import LLM  # noqa: E402
from mixserve.sampling_params import SamplingParams  # noqa: E402
from mixserve.scaling.tasks import get_task  # noqa: E402


def run_model(path: str, tasks: list[str], per_task: int, seed: int, max_tokens: int, threads: int | None
              ) -> dict[str, Any]:
    llm = LLM(path, weight_format="dense", num_threads=threads)
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0)
    out: dict[str, Any] = {"accuracy": {}, "texts": {}}
    for t in tasks:
        task = get_task(t)
        problems = task.generate(per_task, seed, 1)
        prompts = [llm.chat_prompt([{"role": "user", "content": p.question}]) for p in problems]
        texts = [o.outputs[0].text for o in llm.generate(prompts, params)]
        right = sum(task.check(p, task.extract(x)) for p, x in zip(problems, texts, strict=True))
        out["accuracy"][t] = right / per_task
        out["texts"][t] = texts
    out["mean"] = sum(out["accuracy"].values()) / len(tasks)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", required=True, help="name=path,... (the first is the dense reference)")
    ap.add_argument("--tasks", default="arithmetic,sorting,gcd")
    ap.add_argument("--per-task", type=int, default=30)
    ap.add_argument("--seed", type=int, default=555)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    models = dict(item.split("=", 1) for item in args.models.split(","))
    tasks = args.tasks.split(",")
    results: dict[str, Any] = {}
    for name, path in models.items():
        t0 = time.perf_counter()
        results[name] = run_model(path, tasks, args.per_task, args.seed, args.max_tokens, args.threads)
        results[name]["seconds"] = time.perf_counter() - t0
        print(f"{name}: {results[name]['accuracy']} ({results[name]['seconds']:.0f}s)", file=sys.stderr)
    ref = next(iter(results))
    for r in results.values():
        same = [a == b for t in tasks for a, b in zip(r["texts"][t], results[ref]["texts"][t], strict=True)]
        r["same_text_as_dense"] = sum(same) / len(same)
    print(f"\n{'model':<10}" + "".join(f"{t:>12}" for t in tasks) + f"{'mean':>8}{'same text':>11}")
    for name, r in results.items():
        print(f"{name:<10}" + "".join(f"{r['accuracy'][t]:>12.3f}" for t in tasks)
              + f"{r['mean']:>8.3f}{r['same_text_as_dense']:>11.2f}")
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out = HERE / "results" / f"moefy_tasks_{stamp}"
    out.parent.mkdir(exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"args": vars(args), "models": models, "results": results},
                                                   indent=1))
    _plot(results, tasks, out.with_suffix(".png"))
    print(f"wrote {out}.json and .png")
    return 0


def _plot(results: dict[str, Any], tasks: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4))
    width = 0.8 / len(results)
    for i, (name, r) in enumerate(results.items()):
        xs = [j + i * width for j in range(len(tasks) + 1)]
        ax.bar(xs, [r["accuracy"][t] for t in tasks] + [r["mean"]], width, label=name)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(tasks) + 1)], tasks + ["mean"])
    ax.set_ylabel("greedy accuracy")
    ax.set_title("task-suite accuracy: dense vs moefied")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


if __name__ == "__main__":
    sys.exit(main())
