"""Record a moefied real model's routing and its predictors' guesses on real prompts, for replay.

    PYTHONPATH=. .venv/bin/python benchmarks/record_real_trace.py --moe /work/i16/e64k8 --out /work/i16/real64 \
        --prompt-tokens 128 --decode-tokens 36 --threads 1

The moefied model (`mixserve moefy`, e.g. SmolLM2-135M at E = 64, K = 8: OLMoE's E and top-k) runs one
prompt the way `bench_moe.py` runs its model (one prefill pass of `--prompt-tokens` tokens, then greedy
decode steps) with a `RoutingTrace` attached, and at every MoE layer records what each predictor names:
- `lookahead`: layer L+1's router on layer L's input, top-K (the provider's `RouterLookahead`);
- `gate`: the learned 1-ahead gates (`aheadgate.safetensors`), calibrated per-layer widths;
- `pregate`: the pre-gating router (`pregate.safetensors`), every layer at the first MoE layer, calibrated
  per-layer widths.
Prompts are real: chat-formatted task-suite questions (arithmetic, sorting, gcd, countdown) and chat
questions about code, cut to `--prompt-tokens`. A second, disjoint prompt is recorded as the planning
trace (per-layer capacity is planned from it, never from the measured prompt). Writes `trace.npz`,
`plan_trace.npz`, `predictions.json` and `meta.json` into `--out`, and prints each predictor's recall per
layer (per step: prefill and decode apart).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from mixserve.experts.aheadgate import AheadGate  # noqa: E402
from mixserve.experts.predict import RouterLookahead  # noqa: E402
from mixserve.experts.prediction_trace import PredictionTrace, save_predictions  # noqa: E402
from mixserve.experts.pregate import PreGate, step_recall  # noqa: E402
from mixserve.experts.pregate_fit import load_moe  # noqa: E402
from mixserve.experts.trace import RoutingTrace  # noqa: E402
from mixserve.layers.attention import AttentionMetadata  # noqa: E402
from mixserve.layers.moe import moe_layers  # noqa: E402
from mixserve.runner.model_runner import allocate_kv_caches  # noqa: E402
from mixserve.scaling.tasks import get_task  # noqa: E402

CHAT = ("Explain what a Python generator is and when to use one.",
        "Write a function that checks whether a string is a palindrome.",
        "What is the difference between a list and a tuple?",
        "How do I read a CSV file and sum one column?")
TASKS = ("arithmetic", "sorting", "gcd", "countdown")


def prompt_ids(tok: Any, n: int, seed: int) -> list[int]:
    """Chat-formatted task-suite questions and chat questions, in turns, cut to `n` tokens."""
    ids: list[int] = []
    i = 0
    while len(ids) < n:
        task = get_task(TASKS[i % len(TASKS)])
        question = task.generate(1, seed + i, 1)[0].question
        messages = [{"role": "user", "content": question},
                    {"role": "assistant", "content": "Let me work it out."},
                    {"role": "user", "content": CHAT[(i + seed) % len(CHAT)]}]
        ids += tok.encode_chat(messages)
        i += 1
    return ids[:n]


def _forward(model: Any, kv: Any, ids: list[int], start: int) -> int:
    n = len(ids)
    positions = torch.arange(start, start + n)
    meta = AttentionMetadata(query_lens=[n], seq_lens=[start + n], slot_mapping=positions,
                             kv_slots=torch.arange(start + n)[None, :], q_index=None)
    hidden = model.forward_layers(model.embed(torch.tensor(ids)), positions, meta, kv, 0, len(kv))
    return int(model.head(hidden[-1:]).argmax())


def record(model: Any, ids: list[int], decode: int, predictors: dict[str, Any]
           ) -> tuple[RoutingTrace, dict[str, PredictionTrace]]:
    layers = moe_layers(model)
    first = layers[0].layer_idx
    traces = {name: PredictionTrace(name, name == "pregate") for name in predictors}

    def hook(layer: Any, x: torch.Tensor) -> None:
        x = x.detach().float()
        if layer.layer_idx == first:
            for t in traces.values():
                t.steps.append({})
        ids_ = layer.route(x)[0]
        for name, p in predictors.items():
            if name == "pregate":
                if layer.layer_idx == first:
                    traces[name].steps[-1].update(p.predict_step(x))
            else:
                guess = p.predict(layer.layer_idx, x, ids_)
                if guess is not None:
                    traces[name].steps[-1][guess[0]] = guess[1]

    handles = [m.register_forward_pre_hook(lambda mod, args: hook(mod, args[0])) for m in layers]
    trace = RoutingTrace()
    model.set_routing_observer(trace)
    try:
        kv = allocate_kv_caches(model.kv_cache_spec(), len(ids) + decode + 1, 1, torch.float32)
        token = _forward(model, kv, ids, 0)
        for pos in range(len(ids), len(ids) + decode):
            token = _forward(model, kv, [token], pos)
    finally:
        model.set_routing_observer(None)
        for h in handles:
            h.remove()
    return trace, traces


def recall_table(trace: RoutingTrace, preds: dict[str, PredictionTrace]) -> dict[str, Any]:
    """Per predictor: mean step recall over layers it predicts, prefill step apart from decode steps."""
    out: dict[str, Any] = {}
    for name, p in preds.items():
        per_layer: dict[int, list[float]] = {}
        prefill = step_recall(p.steps[0], trace.steps[0].topk_ids)
        for step, guess in zip(trace.steps[1:], p.steps[1:]):
            for layer, r in step_recall(guess, {t: step.topk_ids[t] for t in guess}).items():
                per_layer.setdefault(layer, []).append(r)
        decode = {layer: sum(v) / len(v) for layer, v in sorted(per_layer.items())}
        widths = [len(p.steps[-1][t]) for t in sorted(p.steps[-1])]
        out[name] = {"decode_recall_per_layer": decode,
                     "decode_recall": sum(decode.values()) / len(decode),
                     "prefill_recall": sum(prefill[t] for t in p.steps[0]) / len(p.steps[0]),
                     "mean_width": sum(widths) / len(widths)}
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--moe", required=True, type=Path, help="moefied folder with pregate/aheadgate files")
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--decode-tokens", type=int, default=36, help="warm-up + measured decode steps of the replay")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model, ckpt = load_moe(args.moe)
    k = moe_layers(model)[0].top_k
    routers = {m.layer_idx: m.gate for m in moe_layers(model)}
    args.out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    results = {}
    for label, seed in (("trace", 0), ("plan_trace", 100)):
        predictors = {"lookahead": RouterLookahead(routers, k), "gate": AheadGate.load(args.moe),
                      "pregate": PreGate.load(args.moe)}
        ids = prompt_ids(ckpt.tokenizer, args.prompt_tokens, seed)
        with torch.inference_mode():
            trace, preds = record(model, ids, args.decode_tokens, predictors)
        trace.save(args.out / f"{label}.npz")
        if label == "trace":
            save_predictions(list(preds.values()), args.out / "predictions.json")
            results = recall_table(trace, preds)
    meta = {"moe": str(args.moe), "prompt_tokens": args.prompt_tokens, "decode_tokens": args.decode_tokens,
            "num_layers": len(routers), "top_k": k, "num_experts": moe_layers(model)[0].num_experts,
            "recall": results, "seconds": time.perf_counter() - t0}
    (args.out / "meta.json").write_text(json.dumps(meta, indent=1))
    print(f"{'predictor':<10}{'prefill recall':>16}{'decode recall':>15}{'mean width':>12}")
    for name, r in results.items():
        print(f"{name:<10}{r['prefill_recall']:>16.3f}{r['decode_recall']:>15.3f}{r['mean_width']:>12.1f}")
    print(f"wrote {args.out} in {time.perf_counter() - t0:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
