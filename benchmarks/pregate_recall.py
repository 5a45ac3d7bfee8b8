"""Pre-gate recall on HELD-OUT real text, per layer, for every predictor, with the bytes each prefetches.

    PYTHONPATH=. .venv/bin/python benchmarks/pregate_recall.py --moe /tmp/i16/moefy/e16k4f0.25-coactivation \
        --threads 1 [--calibration-tokens 16384] [--tokens 4096]

The MoE model runs over the calibration text (the default `moefy` set: docstrings of
`CALIBRATION_MODULES`) and over held-out text (docstrings of the disjoint `HELD_OUT_MODULES`); both
recordings keep each layer's router top-k (the model's own routing), the first MoE layer's input and
the next-layer lookahead scores (`pregate_fit.record_routes`). Predictors, all scored on the held-out
recording only:
- `dense-fitted`: the folder's `pregate.safetensors` as `moefy --pregate-from dense` wrote it (fitted on
  routes computed from the dense model's hidden states);
- `own linear` / `own mlp`: fitted on the moefied model's own routing of the calibration windows
  (`refit_pregate`'s procedure: fit on 4/5 of the windows, per-layer top-m calibrated on the other 1/5);
- `own linear+prev`: the linear fit on [x0 of this token, x0 of the previous token] (offline only);
- `lookahead`: layer L's router on layer L-1's input (one layer ahead, not all at once; layer 0 has no
  prediction and reads on demand);
- `own d-ahead gate`: layer L predicted from layer max(0, L-d)'s input by a ridge fit on the own routing
  (d = 1: a learned lookahead, Fate-style; larger d: more layers of compute to hide each read behind;
  the pre-gate is d = num_layers).
Per predictor: per-layer recall (share of each token's routed experts in the predicted set) at m = K,
1.5K, 2K and at the per-layer calibrated m (target --target-recall); experts prefetched per token and
the bytes that costs (bf16 experts: 3 * hidden * moe_intermediate * 2 bytes), and the cold bytes per
decode token without a cache (prefetched + the missed experts read on demand). Recall does not depend
on machine load. Writes benchmarks/results/pregate_recall_<stamp>.json and .png.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

from mixserve.experts.moefy_calib import CALIBRATION_MODULES, HELD_OUT_MODULES, module_docstrings, token_windows
from mixserve.experts.pregate import PreGate, fit_pregate, token_recall
from mixserve.experts.pregate_fit import (
    RouteRecord,
    calibrate_top_m,
    fit_linear,
    fit_mlp,
    load_moe,
    record_routes,
    split_windows,
)

HERE = Path(__file__).resolve().parent
PLOTTED = ("dense-fitted (old)", "own linear (new)", "own mlp", "lookahead (next layer)", "own 4-ahead gate")


def _prev(rec: RouteRecord) -> torch.Tensor:
    """[x0_t, x0_{t-1}] within each window (zeros before the first token)."""
    prev = torch.zeros_like(rec.x0)
    start = 0
    for n in rec.window_lens:
        prev[start + 1:start + n] = rec.x0[start:start + n - 1]
        start += n
    return torch.cat([rec.x0, prev], dim=1)


def _lookahead_scores(rec: RouteRecord) -> torch.Tensor:
    """[num_layers, num_tokens, num_experts]; layer 0 has no lookahead: NaN (no prediction)."""
    first = next(s for s in rec.lookahead if s is not None)
    return torch.stack([torch.full_like(first, float("nan")) if s is None else s for s in rec.lookahead])


def _distance_gate(fit: RouteRecord, e: int, d: int) -> list[torch.Tensor]:
    """Per layer L, `[num_experts, hidden]` ridge weights from layer max(0, L - d)'s input to L's routing."""
    return [fit_pregate(fit.inputs[max(0, layer - d)], [ids], e)[0] for layer, ids in enumerate(fit.routes)]


def _distance_scores(rec: RouteRecord, weights: list[torch.Tensor], d: int) -> torch.Tensor:
    return torch.stack([rec.inputs[max(0, layer - d)] @ w.T for layer, w in enumerate(weights)])


def _recall(scores: torch.Tensor, routes: list[torch.Tensor], widths: list[int]) -> list[float]:
    """`token_recall`, NaN for layers without a prediction (NaN scores)."""
    out = token_recall(torch.nan_to_num(scores, nan=0.0), routes, widths)
    return [float("nan") if bool(scores[i].isnan().any()) else r for i, r in enumerate(out)]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--moe", required=True, help="moefied folder (its pregate.safetensors: the dense-fitted one)")
    ap.add_argument("--calibration-tokens", type=int, default=16384)
    ap.add_argument("--tokens", type=int, default=4096, help="held-out tokens")
    ap.add_argument("--window", type=int, default=256)
    ap.add_argument("--target-recall", type=float, default=0.95)
    ap.add_argument("--mlp-steps", type=int, default=400)
    ap.add_argument("--distances", type=int, nargs="*", default=[1, 2, 4, 8],
                    help="d of the d-ahead gates (predict layer L from layer L-d's input)")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model, ckpt = load_moe(args.moe)
    cfg = ckpt.hf_config
    e, k = int(cfg["num_experts"]), int(cfg["num_experts_per_tok"])
    expert_bytes = 3 * int(cfg["hidden_size"]) * int(cfg["moe_intermediate_size"]) * 2
    tok = ckpt.tokenizer

    def windows(mods: tuple[str, ...], n: int) -> list[list[int]]:
        return token_windows([tok.encode(t) for t in module_docstrings(mods)], args.window, n)

    t0 = time.perf_counter()
    cal = record_routes(model, windows(CALIBRATION_MODULES, args.calibration_tokens), keep_inputs=True)
    held = record_routes(model, windows(HELD_OUT_MODULES, args.tokens), keep_inputs=True)
    print(f"recorded {sum(cal.window_lens)} calibration + {sum(held.window_lens)} held-out tokens "
          f"in {time.perf_counter() - t0:.0f}s", file=sys.stderr)
    fit_idx, back_idx = split_windows(len(cal.window_lens), 0.2)
    fit, back = cal.select(fit_idx), cal.select(back_idx)

    scorers: dict[str, tuple[Any, Any]] = {}  # name -> (scores on held-back calibration, on held-out)
    old = PreGate.load(args.moe, top_m=k)
    scorers["dense-fitted (old)"] = (old.scores(back.x0), old.scores(held.x0))
    lin = fit_linear(fit, e, k)
    scorers["own linear (new)"] = (lin.scores(back.x0), lin.scores(held.x0))
    t1 = time.perf_counter()
    mlp = fit_mlp(fit, e, k, steps=args.mlp_steps)
    print(f"mlp fitted in {time.perf_counter() - t1:.0f}s", file=sys.stderr)
    scorers["own mlp"] = (mlp.scores(back.x0), mlp.scores(held.x0))
    w = fit_pregate(_prev(fit), fit.routes, e)
    scorers["own linear+prev"] = (torch.einsum("th,leh->lte", _prev(back), w),
                                  torch.einsum("th,leh->lte", _prev(held), w))
    scorers["lookahead (next layer)"] = (_lookahead_scores(back), _lookahead_scores(held))
    for d in args.distances:
        wd = _distance_gate(fit, e, d)
        scorers[f"own {d}-ahead gate"] = (_distance_scores(back, wd, d), _distance_scores(held, wd, d))

    widths = {"K": k, "1.5K": min(e, (3 * k) // 2), "2K": min(e, 2 * k)}
    rows: list[dict[str, Any]] = []
    for name, (s_back, s_held) in scorers.items():
        predicted = [not bool(s_held[i].isnan().any()) for i in range(len(held.routes))]
        calibrated = calibrate_top_m(torch.nan_to_num(s_back, nan=0.0), back.routes, args.target_recall)
        per_m = {label: [m] * len(held.routes) for label, m in widths.items()}
        per_m["calibrated"] = calibrated
        for label, ms in per_m.items():
            ms = [m if p else 0 for m, p in zip(ms, predicted)]  # no prediction: nothing prefetched
            recall = _recall(s_held, held.routes, [max(1, m) for m in ms])
            scored = [r for r in recall if r == r]
            fetched = sum(ms) * expert_bytes
            missed = sum(k * (1 - (r if r == r else 0.0)) for r in recall) * expert_bytes
            rows.append({"predictor": name, "m": label, "mean_m": sum(ms) / sum(predicted), "top_m": ms,
                         "recall": recall, "mean_recall": sum(scored) / len(scored), "min_recall": min(scored),
                         "prefetch_mb_per_token": fetched / 1e6, "cold_mb_per_token": (fetched + missed) / 1e6})
    trade = {name: [(m, float(torch.tensor(_recall(s_held, held.routes, [m] * len(held.routes))).nanmean()))
                    for m in range(k, e + 1)] for name, (_, s_held) in scorers.items()}

    print(f"\nheld-out: {sum(held.window_lens)} tokens ({len(HELD_OUT_MODULES)} stdlib modules' docstrings); "
          f"E={e} K={k}; expert {expert_bytes / 1e6:.3f} MB (bf16); {len(held.routes)} layers")
    print(f"{'predictor':<24}{'m':>11}{'mean m':>8}{'recall':>8}{'min':>7}{'prefetch MB/tok':>17}{'cold MB/tok':>13}")
    for r in rows:
        print(f"{r['predictor']:<24}{r['m']:>11}{r['mean_m']:>8.2f}{r['mean_recall']:>8.3f}{r['min_recall']:>7.3f}"
              f"{r['prefetch_mb_per_token']:>17.2f}{r['cold_mb_per_token']:>13.2f}")
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out = HERE / "results" / f"pregate_recall_{stamp}.json"
    out.write_text(json.dumps({"args": vars(args), "num_experts": e, "top_k": k, "expert_bytes": expert_bytes,
                               "calibration_tokens": sum(cal.window_lens), "held_out_tokens": sum(held.window_lens),
                               "rows": rows, "tradeoff": trade}, indent=2))
    _plot(rows, trade, k, out.with_suffix(".png"))
    print(f"wrote {out}")
    return 0


def _plot(rows: list[dict[str, Any]], trade: dict[str, list[tuple[int, float]]], k: int, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(13, 4.5))
    for r in rows:
        if r["m"] in ("2K", "calibrated") and r["predictor"] in PLOTTED:
            a.plot(r["recall"], marker=".", linestyle="-" if r["m"] == "2K" else "--",
                   label=f"{r['predictor']}, m={r['m'] if r['m'] == '2K' else 'calibrated'} ({r['mean_m']:.1f})")
    a.axhline(0.95, color="grey", linewidth=0.8)
    a.set_xlabel("MoE layer")
    a.set_ylabel("recall on held-out text")
    a.set_title(f"per-layer recall (2K = {2 * k}; dashed: per-layer m for 0.95)")
    a.legend(fontsize=7)
    for name, pts in trade.items():
        b.plot([m for m, _ in pts], [r for _, r in pts], marker=".", label=name)
    b.axhline(0.95, color="grey", linewidth=0.8)
    b.set_xlabel("experts prefetched per layer and token (m)")
    b.set_ylabel("mean recall on held-out text")
    b.set_title("recall vs prefetch width (bytes ~ m)")
    b.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)


if __name__ == "__main__":
    sys.exit(main())
