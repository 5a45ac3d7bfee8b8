"""Compute-optimal allocation vs uniform majority voting on the synthetic policy (no model weights).

A batch mixes easy problems (the right answer with p = 0.9), contested ones (0.4 against four wrong
answers at 0.15) and ones beyond the model (0.1 against nine at 0.1), 50/30/20. Uniform majority@N
gives every problem N samples; compute_optimal gets a mean budget B per problem (B * problems in all),
probes 4, stops settled votes and spends the rest where more samples can still change the vote.
Prints accuracy against generated tokens for both (median over seeds of the totals), writes JSON and a PNG.

    PYTHONPATH=. python benchmarks/bench_scaling_compute_optimal.py --problems 300 --seeds 3
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from mixserve.sampling_params import SamplingParams
from mixserve.scaling import ScaleResult, make_strategies, run_strategies
from mixserve.scaling.synthetic import AnswerPolicy, AnswerSpec, WordTokenizer, make_synthetic_engine


def mixed_specs(n: int) -> dict[str, AnswerSpec]:
    out = {}
    for i in range(n):
        kind = i % 10
        if kind < 5:
            out[str(i)] = AnswerSpec("42", 0.9, (("7", 1.0), ("8", 1.0)))
        elif kind < 8:
            out[str(i)] = AnswerSpec("42", 0.4, tuple((str(w), 1.0) for w in range(1, 5)))
        else:
            out[str(i)] = AnswerSpec("42", 0.1, tuple((str(w), 1.0) for w in range(1, 10)))
    return out


def run(name: str, budget: int, problems: int, seed: int) -> tuple[float, int, int]:
    specs = mixed_specs(problems)
    tok = WordTokenizer()
    engine = make_synthetic_engine(AnswerPolicy(specs), tok, num_blocks=16384, max_num_seqs=4096)
    made = make_strategies(name, [tok.encode(f"Q{pid}: solve\n") for pid in specs], budget,
                           SamplingParams(temperature=1.0, max_tokens=16, seed=seed), strategy_id=f"{name}{seed}")
    results: list[ScaleResult] = []
    for r in run_strategies(engine, made):
        results.extend(r if isinstance(r, list) else [r])
    accuracy = sum(r.answer == "42" for r in results) / len(results)
    tokens = sum(r.usage.policy_generated_tokens for r in results)
    samples = sum(r.usage.num_samples for r in results)
    return accuracy, tokens, samples


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--problems", type=int, default=300)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--uniform", default="2,4,8,16,32")
    ap.add_argument("--optimal", default="4,6,8,10,12,16")
    ap.add_argument("--out", default="benchmarks/results/scaling_compute_optimal")
    args = ap.parse_args()
    rows = []
    for name, budgets in (("majority", args.uniform), ("compute_optimal", args.optimal)):
        for budget in map(int, budgets.split(",")):
            runs = [run(name, budget, args.problems, seed) for seed in range(args.seeds)]
            rows.append({"strategy": name, "budget": budget,
                         "accuracy": statistics.median(r[0] for r in runs),
                         "tokens_per_problem": statistics.median(r[1] for r in runs) / args.problems,
                         "samples_per_problem": statistics.median(r[2] for r in runs) / args.problems,
                         "accuracy_per_seed": [r[0] for r in runs]})
    print(f"{'strategy':<16}{'budget':>7}{'accuracy':>10}{'tokens/problem':>16}{'samples/problem':>17}")
    for r in rows:
        print(f"{r['strategy']:<16}{r['budget']:>7}{r['accuracy']:>10.3f}{r['tokens_per_problem']:>16.1f}"
              f"{r['samples_per_problem']:>17.2f}")
    ref = next(r for r in rows if r["strategy"] == "majority" and r["budget"] == 16)
    reach = [r for r in rows if r["strategy"] == "compute_optimal" and r["accuracy"] >= ref["accuracy"]]
    if reach:
        best = min(reach, key=lambda r: r["tokens_per_problem"])
        print(f"compute_optimal reaches uniform majority@16 accuracy ({ref['accuracy']:.3f}) at budget "
              f"{best['budget']} with {best['tokens_per_problem'] / ref['tokens_per_problem']:.0%} of its tokens")
    else:
        print("compute_optimal did not reach uniform majority@16 accuracy in this sweep")
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from mixserve.scaling.report import plain_number

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, style in (("majority", "o-"), ("compute_optimal", "s--")):
        pts = sorted((r["tokens_per_problem"], r["accuracy"], r["budget"]) for r in rows if r["strategy"] == name)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], style, label=f"{name} (no verifier)")
        for x, y, b in pts:
            ax.annotate(str(b), (x, y), textcoords="offset points", xytext=(4, -10), fontsize=7)
    ax.set_xscale("log", base=2)
    from matplotlib.ticker import FuncFormatter

    ax.xaxis.set_major_formatter(FuncFormatter(plain_number))
    ax.set_xlabel("generated tokens per problem (labels: budget)")
    ax.set_ylabel("accuracy")
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title(f"synthetic 50/30/20 easy/contested/hopeless mix, {args.problems} problems")
    fig.tight_layout()
    fig.savefig(out / "accuracy_vs_tokens.png", dpi=110)
    print(f"wrote {out}/results.json and accuracy_vs_tokens.png")


if __name__ == "__main__":
    main()
