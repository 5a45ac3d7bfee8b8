"""Quality of moefied models against their dense source, on held-out text.

    PYTHONPATH=. .venv/bin/python benchmarks/moefy_quality.py --dense smollm2-135m \
        --build benchmarks/work/moefy --variants 16:4:0.25:coactivation,64:16:0.25:coactivation [--moe DIR ...]

--variants E:K:F:METHOD builds each moefied model into --build/<name> first (one calibration recording
shared by all of them; an existing folder is reused).

Held-out text: the docstrings of `HELD_OUT_MODULES` (standard library, disjoint from the calibration
modules), cut into windows of --window tokens, --tokens in all. For every model: perplexity on that text
and top-1 agreement with the dense model (share of positions where the argmax next token is the same,
i.e. teacher-forced greedy agreement); plus greedy continuations of --gen-tokens from the first tokens of
each window, scored as the share of generated tokens identical to the dense model's before the first
divergence. Prints a table; writes benchmarks/results/moefy_quality_<stamp>.json and .png.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch

from mixserve.experts.moefy_calib import HELD_OUT_MODULES, forward_logits, module_docstrings, token_windows
from mixserve.hub import resolve_model
from mixserve.loading.checkpoint import load_checkpoint
from mixserve.models.base import build_model

HERE = Path(__file__).resolve().parent


def _load(path: str) -> tuple[Any, dict[str, Any]]:
    ckpt = load_checkpoint(resolve_model(path, progress=False))
    model = build_model(ckpt.hf_config, torch.float32)
    model.load_weights(ckpt.weights(dtype=torch.float32))
    return model.eval(), ckpt.hf_config


def _greedy(model: Any, prompt: list[int], n: int) -> list[int]:
    ids = list(prompt)
    for _ in range(n):  # full re-forward per token: slow but path-independent, fine for short runs
        ids.append(int(forward_logits(model, ids)[-1].argmax()))
    return ids[len(prompt):]


def evaluate(model: Any, windows: list[list[int]], dense_top1: list[torch.Tensor] | None,
             dense_gen: list[list[int]] | None, gen_tokens: int, prompt_len: int
             ) -> tuple[dict[str, float], list[torch.Tensor], list[list[int]]]:
    nll, count, agree = 0.0, 0, 0
    top1s, gens = [], []
    for i, ids in enumerate(windows):
        logits = forward_logits(model, ids)[:-1]
        target = torch.tensor(ids[1:])
        nll += float(torch.nn.functional.cross_entropy(logits, target, reduction="sum"))
        count += len(target)
        top1 = logits.argmax(-1)
        top1s.append(top1)
        if dense_top1 is not None:
            agree += int((top1 == dense_top1[i]).sum())
        gens.append(_greedy(model, ids[:prompt_len], gen_tokens) if gen_tokens else [])
    prefix = 0.0
    if dense_gen is not None and gen_tokens:
        for g, d in zip(gens, dense_gen):
            same = next((j for j, (a, b) in enumerate(zip(g, d)) if a != b), len(d))
            prefix += same / len(d)
        prefix /= len(gens)
    return ({"ppl": math.exp(nll / count), "top1_agreement": agree / count if dense_top1 is not None else 1.0,
             "greedy_prefix_agreement": prefix if dense_gen is not None else 1.0, "num_tokens": count},
            top1s, gens)


def _build(args: argparse.Namespace) -> list[str]:
    from mixserve.experts.moefy import MoefyConfig, calibrate, moefy

    if not args.variants:
        return []
    if args.build is None:
        raise SystemExit("--variants needs --build")
    configs = []
    for v in args.variants.split(","):
        e, k, f, method = v.split(":")
        out = Path(args.build) / f"e{e}k{k}f{f}-{method}"
        configs.append(MoefyConfig(args.dense, str(out), int(e), int(k), float(f), method=method))  # type: ignore[arg-type]
    todo = [c for c in configs if not (Path(c.out) / "moefy.json").is_file()]
    if todo:
        calibrated = calibrate(todo[0])
        for c in todo:
            report = moefy(c, calibrated=calibrated)
            print(f"built {c.out} in {report.seconds:.0f}s", file=sys.stderr)
        del calibrated
    return [c.out for c in configs]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dense", required=True)
    ap.add_argument("--moe", nargs="*", default=[])
    ap.add_argument("--build", default=None, help="folder for the --variants checkpoints")
    ap.add_argument("--variants", default="", help="E:K:F:METHOD,... to moefy first")
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--window", type=int, default=256)
    ap.add_argument("--gen-tokens", type=int, default=16)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    moe_paths = list(args.moe) + _build(args)
    dense, _ = _load(args.dense)
    tok = load_checkpoint(resolve_model(args.dense, progress=False)).tokenizer
    windows = token_windows([tok.encode(t) for t in module_docstrings(HELD_OUT_MODULES)], args.window, args.tokens)
    gen_windows = windows[: max(1, len(windows) // 2)]
    rows: list[dict[str, Any]] = []
    base, top1, _ = evaluate(dense, windows, None, None, 0, args.prompt_len)
    _, _, dense_gen = evaluate(dense, gen_windows, None, None, args.gen_tokens, args.prompt_len)
    rows.append({"model": "dense", **base})
    print(f"dense: ppl {base['ppl']:.2f}", file=sys.stderr)
    del dense
    for path in moe_paths:
        model, cfg = _load(path)
        meta = json.loads((Path(path) / "moefy.json").read_text())
        res, _, _ = evaluate(model, windows, top1, None, 0, args.prompt_len)
        gen, _, _ = evaluate(model, gen_windows, None, dense_gen, args.gen_tokens, args.prompt_len)
        rep = meta["report"]
        rows.append({"model": Path(path).name, "E": cfg["num_experts"], "K": cfg["num_experts_per_tok"],
                     "shared": cfg.get("shared_expert_intermediate_size", 0), "method": rep["method"], **res,
                     "greedy_prefix_agreement": gen["greedy_prefix_agreement"],
                     "router_recall": sum(rep["router_recall"]) / len(rep["router_recall"]),
                     "covered_mass": sum(rep["covered_mass"]) / len(rep["covered_mass"])})
        print(f"{path}: {rows[-1]}", file=sys.stderr)
        del model
    print(f"\nheld-out: {base['num_tokens']} tokens of stdlib docstrings ({len(HELD_OUT_MODULES)} modules)")
    print(f"{'model':<22}{'E':>4}{'K':>4}{'shared':>7}{'method':>13}{'ppl':>9}{'ppl/dense':>10}"
          f"{'top1 agr':>9}{'greedy':>8}{'recall':>8}")
    for r in rows:
        print(f"{r['model']:<22}{r.get('E', '-'):>4}{r.get('K', '-'):>4}{r.get('shared', '-'):>7}"
              f"{r.get('method', '-'):>13}{r['ppl']:>9.2f}{r['ppl'] / base['ppl']:>10.3f}"
              f"{r['top1_agreement']:>9.3f}{r['greedy_prefix_agreement']:>8.3f}{r.get('router_recall', 1.0):>8.3f}")
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out = HERE / "results" / f"moefy_quality_{stamp}.json"
    out.write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2))
    _plot(rows, out.with_suffix(".png"))
    print(f"wrote {out}")
    return 0


def _plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    names = [r["model"] for r in rows]
    a.bar(names, [r["ppl"] for r in rows])
    a.set_ylabel("held-out perplexity")
    b.bar(names, [r["top1_agreement"] for r in rows], label="top-1")
    b.set_ylabel("agreement with dense")
    for ax in (a, b):
        ax.tick_params(axis="x", rotation=45)
    fig.tight_layout()
    fig.savefig(path)


if __name__ == "__main__":
    sys.exit(main())
