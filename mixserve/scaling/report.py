"""Eval output: a text table, a JSON file, and PNG plots of accuracy / coverage against samples,
generated tokens and FLOPs (matplotlib, Agg backend)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

COLUMNS = [("strategy", "{:<10}"), ("budget", "{:>6}"), ("verifier", "{:<10}"), ("accuracy", "{:>8.3f}"),
           ("coverage", "{:>8.3f}"), ("samples", "{:>7.1f}"), ("generated_tokens", "{:>9.0f}"),
           ("prefill_tokens", "{:>8.0f}"), ("reused_tokens", "{:>8.0f}"), ("verifier_tokens", "{:>8.0f}"),
           ("flops", "{:>9.2e}"), ("seconds", "{:>7.1f}")]
HEADERS = ["strategy", "budget", "verifier", "accuracy", "coverage", "samples", "gen_tok", "prefill",
           "reused", "verif_tok", "flops/q", "seconds"]


def format_table(rows: list[dict[str, Any]]) -> str:
    widths = [max(len(h), len(fmt.format(rows[0][c]) if rows else "")) for h, (c, fmt) in
              zip(HEADERS, COLUMNS, strict=True)]
    lines = [" ".join(h.rjust(w) for h, w in zip(HEADERS, widths, strict=True))]
    for row in rows:
        lines.append(" ".join(fmt.format(row[c]).rjust(w) for (c, fmt), w in zip(COLUMNS, widths, strict=True)))
    coverage = [r for r in rows if "pass_at_k" in r]
    if coverage:
        best = max(coverage, key=lambda r: r["budget"])
        lines.append(f"unbiased pass@k (sample, N={best['budget']}): " +
                     ", ".join(f"k={k}: {v:.3f}" for k, v in best["pass_at_k"].items()))
    return "\n".join(lines)


def write_outputs(rows: list[dict[str, Any]], config: Any, model: str, out_dir: Path) -> list[Path]:
    from mixserve.scaling.evaluate import config_dict

    out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"{Path(model).stem}-{config.task}-d{'-'.join(map(str, config.difficulty))}"
    json_path = out_dir / f"{stem}.json"
    json_path.write_text(json.dumps({"model": model, "config": config_dict(config), "rows": rows}, indent=2))
    title = f"{model} on {config.task} (difficulty {', '.join(map(str, config.difficulty))})"
    return [json_path, plot(rows, out_dir / f"{stem}.png", title)]


def plot(rows: list[dict[str, Any]], path: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, LogLocator

    styles = [("o", "-"), ("s", "--"), ("^", "-."), ("D", ":"), ("v", "-"), ("P", "--"), ("X", "-."), ("*", ":")]
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.6))
    for ax, (x, label) in zip(axes, [("budget", "samples / particles (budget)"),
                                     ("generated_tokens", "generated tokens per problem"),
                                     ("flops", "estimated FLOPs per problem")], strict=True):
        strategies = list(dict.fromkeys(r["strategy"] for r in rows))
        for i, strategy in enumerate(strategies):
            mine = [r for r in rows if r["strategy"] == strategy]
            pts = sorted((r[x], r["accuracy"]) for r in mine)
            verifier = mine[0].get("verifier", "none")
            marker, line = styles[i % len(styles)]
            # later lines are drawn thinner with bigger hollow markers, so lines that coincide stay visible
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=marker, linestyle=line,
                    linewidth=2.6 - 1.6 * i / max(len(strategies) - 1, 1), markersize=5 + 2 * i,
                    markerfacecolor="none", label=strategy if verifier == "none" else f"{strategy} ({verifier})")
        sample = sorted((r for r in rows if r["strategy"] == "sample"), key=lambda r: r["budget"])
        if sample:
            pts = [(r[x], r["coverage"]) for r in sample]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "k--", marker="x", label="coverage")
            if x == "budget":
                ks = sample[-1]["pass_at_k"]
                ax.plot(list(map(int, ks)), list(ks.values()), "k:", label="pass@k (unbiased)")
        if all(r[x] > 0 for r in rows):  # FLOPs are 0 when the model cost is unknown
            ax.set_xscale("log", base=2 if x == "budget" else 10)
            if x != "budget":
                ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
            ax.xaxis.set_minor_formatter(FuncFormatter(lambda v, _: ""))
        ax.xaxis.set_major_formatter(FuncFormatter(plain_number))
        ax.set_xlabel(label)
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("accuracy")
    axes[0].legend(fontsize=8, title="strategy (verifier)", title_fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plain_number(value: float, _: object = None) -> str:
    """Axis labels as plain numbers: 32, 1500, 2.5M, 4.1G (no 3x10^1)."""
    for scale, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M")):
        if abs(value) >= scale:
            return f"{value / scale:g}{suffix}"
    return f"{value:g}"
