"""`mixserve moefy MODEL OUT --num-experts E --top-k K [...]` and `mixserve refit-pregate MODEL [...]`."""

from __future__ import annotations

import argparse
import json
import sys


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register the `moefy` subcommand on `sub`."""
    p = sub.add_parser("moefy", help="turn a dense llama/qwen2/qwen3/gemma3 checkpoint into an MoE checkpoint "
                                     "(MoEfication)")
    p.add_argument("model", help="dense model: known name, HF folder or GGUF file")
    p.add_argument("out", help="output folder (new or empty)")
    p.add_argument("--num-experts", "-E", type=int, required=True, help="routed experts per layer")
    p.add_argument("--top-k", "-K", type=int, required=True, help="routed experts per token")
    p.add_argument("--shared-fraction", type=float, default=0.0,
                   help="share of each FFN's neurons in the always-on shared expert (default: %(default)s)")
    p.add_argument("--method", choices=["coactivation", "kmeans"], default="coactivation",
                   help="how neurons are grouped into experts (default: %(default)s)")
    p.add_argument("--calibration", nargs="+", default=[], metavar="FILE",
                   help="text files to calibrate on (default: the standard-library docstring set)")
    p.add_argument("--calibration-tokens", type=int, default=4096, help="tokens recorded (default: %(default)s)")
    p.add_argument("--pregate-from", choices=["moe", "dense"], default="moe",
                   help="fit the pre-gating router on the written model's own routing (moe) or on routes "
                        "from the dense model's hidden states (dense) (default: %(default)s)")
    p.add_argument("--target-recall", type=float, default=0.95,
                   help="per-layer pre-gate width: smallest m reaching this recall (default: %(default)s)")
    p.add_argument("--pregate-tokens", type=int, default=16384,
                   help="calibration tokens the pre-gate is fitted on, --pregate-from moe (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cache-dir", default=None)
    p.set_defaults(func=cmd_moefy)
    r = sub.add_parser("refit-pregate", help="fit an MoE folder's pre-gating router on its own routing")
    r.add_argument("model", help="MoE folder (e.g. written by `mixserve moefy`); pregate.safetensors is replaced")
    r.add_argument("--kind", choices=["linear", "mlp"], default="linear",
                   help="closed-form ridge (linear) or one GELU hidden layer (mlp) (default: %(default)s)")
    r.add_argument("--target-recall", type=float, default=0.95,
                   help="per-layer width: smallest m reaching this held-back recall (default: %(default)s)")
    r.add_argument("--calibration", nargs="+", default=[], metavar="FILE",
                   help="text files to record routing on (default: the standard-library docstring set)")
    r.add_argument("--calibration-tokens", type=int, default=16384, help="tokens recorded (default: %(default)s)")
    r.add_argument("--ahead", type=int, default=1, metavar="D",
                   help="also fit the D-layer-ahead gates (aheadgate.safetensors; `--expert-prefetch gate`); "
                        "0: none (default: %(default)s)")
    r.add_argument("--threads", type=int, default=None, help="torch threads")
    r.add_argument("--seed", type=int, default=0)
    r.set_defaults(func=cmd_refit)


def cmd_moefy(args: argparse.Namespace) -> int:
    from mixserve.experts.moefy import MoefyConfig, moefy

    config = MoefyConfig(model=args.model, out=args.out, num_experts=args.num_experts, top_k=args.top_k,
                         shared_fraction=args.shared_fraction, method=args.method,
                         calibration_files=tuple(args.calibration),
                         max_calibration_tokens=args.calibration_tokens, seed=args.seed, cache_dir=args.cache_dir,
                         pregate_from=args.pregate_from, target_recall=args.target_recall,
                         pregate_tokens=args.pregate_tokens)
    report = moefy(config)
    recall = sum(report.router_recall) / len(report.router_recall)
    mass = sum(report.covered_mass) / len(report.covered_mass)
    print(json.dumps({"out": report.out, "num_experts": report.num_experts, "top_k": report.top_k,
                      "shared_neurons": report.num_shared, "expert_neurons": report.expert_size,
                      "mean_router_recall": round(recall, 4), "mean_covered_mass": round(mass, 4),
                      "seconds": round(report.seconds, 1)}))
    print(f"[moefy] wrote {report.out} (details in moefy.json)", file=sys.stderr)
    return 0


def cmd_refit(args: argparse.Namespace) -> int:
    import torch

    from mixserve.experts.pregate_fit import RefitConfig, refit_pregate

    if args.threads:
        torch.set_num_threads(args.threads)
    config = RefitConfig(model=args.model, kind=args.kind, target_recall=args.target_recall,
                         calibration_files=tuple(args.calibration), max_calibration_tokens=args.calibration_tokens,
                         seed=args.seed, ahead=args.ahead)
    report = refit_pregate(config)
    n = len(report.top_m)
    out = {"model": report.model, "kind": report.kind, "num_tokens": report.num_tokens,
           "top_m": report.top_m, "mean_recall_top_k": round(sum(report.recall_top_k) / n, 4),
           "mean_recall": round(sum(report.recall) / n, 4)}
    if report.ahead:
        a = len(report.ahead_top_m)
        out.update(ahead=report.ahead, ahead_top_m=report.ahead_top_m,
                   ahead_mean_recall_2k=round(sum(report.ahead_recall_2k) / a, 4),
                   ahead_mean_recall=round(sum(report.ahead_recall) / a, 4))
    print(json.dumps(out))
    print(f"[refit-pregate] wrote {args.model}/pregate.safetensors (details in pregate.json)", file=sys.stderr)
    return 0
