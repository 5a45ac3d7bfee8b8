"""MoE under a memory budget: all-in-RAM vs mmap-under-limit vs on-demand vs LRU vs ours (LFRU + prefetch).

    .venv/bin/python benchmarks/bench_moe.py --quick        # small model (4 layers, hidden 256): a minute
    .venv/bin/python benchmarks/bench_moe.py                # OLMoE shape: 16 layers, 64 experts, top-8, bf16
    .venv/bin/python benchmarks/bench_moe.py --model DIR    # a real MoE folder (e.g. `mixserve moefy` output)
    .venv/bin/python benchmarks/bench_moe.py --num-layers 8 --replay DIR   # OLMoE shape, real routing replayed

With --replay DIR (written by `record_real_trace.py` from a moefied real model with the OLMoE shape's E
and top-k), the OLMoE-shaped model's MoE layers take the recorded routing of the real model's first
layers ("replay" trace), lookahead/gate/ours replay the real model's recorded predictions, and per-layer
capacity is planned from the recording of a different prompt (DIR/plan_trace.npz).

With --model, the experts are packed as bf16, the routing is the model's own ("real" trace) on real
text: the prompt is held-out standard-library docstrings (moefy_calib.HELD_OUT_MODULES), and the ram run
also records the routing of a different planning text, from which (e) plans its per-layer capacity.

On a random-initialised OLMoE-shaped model (built once, layer by layer, into --work-dir, then packed),
at budgets of 10/25/50/100% of expert bytes, for routing from a synthetic Zipf trace (skew, temporal
locality, inter-layer affinity; replayed through the route-source seam, identical in every run) and
the random model's own routing ("real": near-uniform, no locality), each configuration runs in a
fresh child process:
  (a) ram       all experts in RAM (no limit): the budgeted provider at 100%, every expert read up front
  (b) mmap      plain mmap of the safetensors checkpoint, under the memory limit
  (c) ondemand  read experts from the pack on every use, no cache, no prediction
  (d) lru       budgeted cache, LRU
  (d') lookahead budgeted cache, LFRU + next-layer prefetch (affinity on synthetic routes, router on real)
  (d'') gate     as lookahead, with the learned 1-layer-ahead gates (aheadgate.safetensors; --model only)
  (e) ours      as lookahead, but with the model's pre-gating router (moefy's pregate.safetensors) when
                it has one: every layer's experts fetched at the first MoE layer
(b)-(e) run inside a cgroup v1 memory limit of budget + non-expert bytes + --overhead-mib (page cache
counts), with the files' page cache dropped before each run; (c)-(e) read with O_DIRECT unless
--buffered-io (then the page cache inside the same limit helps them as it helps mmap). It prints a
table, the offline policy simulation (LRU/LFU/LFRU/Belady hit rates on the same synthetic trace) and
the issue's targets; writes benchmarks/results/moe_<quick|full>_<stamp>.json and .png.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from moe_cgroup import drop_file_cache, run_limited  # noqa: E402
from moe_checkpoint import MoeShape, build_checkpoint  # noqa: E402
from moe_report import print_report, save_plot, targets  # noqa: E402

from mixserve.experts.budgeted import BudgetedExpertProvider  # noqa: E402
from mixserve.experts.cache import plan_capacity  # noqa: E402
from mixserve.experts.moefy_calib import HELD_OUT_MODULES, module_docstrings  # noqa: E402
from mixserve.experts.pack import dtype_plan, write_pack  # noqa: E402
from mixserve.experts.simulate import compare_policies  # noqa: E402
from mixserve.experts.store import ExpertStore  # noqa: E402
from mixserve.experts.synthetic import SyntheticRouting, SyntheticRoutingConfig  # noqa: E402
from mixserve.loading.tokenizer import load_tokenizer  # noqa: E402

QUICK = MoeShape(num_hidden_layers=4, hidden_size=256, intermediate_size=128, num_experts=64,
                 num_experts_per_tok=8, num_attention_heads=4, vocab_size=1024)
MODES = ("ram", "mmap", "ondemand", "lru", "lookahead", "gate", "ours")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small model and short runs (checks the benchmark)")
    p.add_argument("--model", type=Path, default=None, help="benchmark this MoE HF folder instead")
    p.add_argument("--work-dir", type=Path, default=None, help="checkpoint + pack (default benchmarks/work/moe_*)")
    p.add_argument("--num-layers", type=int, default=None, help="override the number of layers")
    p.add_argument("--budgets", default=None, help="fractions of expert bytes (default 0.1,0.25,0.5,1.0; "
                                                    "--quick: 0.25,0.5)")
    p.add_argument("--traces", default=None, help="zipf,real (default; --model: real; --replay: replay)")
    p.add_argument("--replay", type=Path, default=None,
                   help="folder from record_real_trace.py: replay its routing and predictions")
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--prefill-tokens", type=int, default=None)
    p.add_argument("--decode-tokens", type=int, default=None)
    p.add_argument("--warmup-tokens", type=int, default=4)
    p.add_argument("--zipf-alpha", type=float, default=1.2)
    p.add_argument("--stickiness", type=float, default=0.5)
    p.add_argument("--affinity", type=float, default=0.5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--io-threads", type=int, default=4)
    p.add_argument("--buffered-io", action="store_true",
                   help="read the pack through the page cache (default O_DIRECT: cold reads measured 3.7x "
                        "faster here, 1.3 vs 0.35 GB/s)")
    p.add_argument("--overhead-mib", type=int, default=None, help="limit slack beyond experts + dense weights")
    p.add_argument("--timeout-s", type=float, default=3600)
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def prepare_model(args: argparse.Namespace) -> tuple[MoeShape, Path, Path]:
    """A given MoE folder: its shape and a bf16 pack of it in the work dir."""
    cfg = json.loads((args.model / "config.json").read_text())
    shape = MoeShape(num_hidden_layers=cfg["num_hidden_layers"], hidden_size=cfg["hidden_size"],
                     intermediate_size=cfg.get("moe_intermediate_size", cfg["intermediate_size"]),
                     num_experts=cfg["num_experts"], num_experts_per_tok=cfg["num_experts_per_tok"],
                     num_attention_heads=cfg["num_attention_heads"], vocab_size=cfg["vocab_size"])
    work = args.work_dir or HERE / "work" / f"moe_{args.model.name}"
    pack = work / "pack"
    if not (pack / "experts.json").is_file():
        write_pack(args.model, pack, choose=dtype_plan("bfloat16"), overwrite=True)
    return shape, fused_bf16_experts(args.model, work / "mmap", shape), pack


def fused_bf16_experts(model: Path, out: Path, shape: MoeShape) -> Path:
    """The experts of `model` as the mmap baseline reads them: bf16 `mlp.experts.gate_up_proj`
    `[E, 2*inter, hidden]` and `down_proj` `[E, hidden, inter]` (+ the pre-gate, if any)."""
    index = out / "model.safetensors.index.json"
    if index.is_file():
        return out
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    out.mkdir(parents=True, exist_ok=True)
    src = load_file(str(model / "model.safetensors"))
    fused = {}
    for layer in range(shape.num_hidden_layers):
        p = f"model.layers.{layer}.mlp.experts"
        e = range(shape.num_experts)
        fused[f"{p}.gate_up_proj"] = torch.stack([torch.cat([src[f"{p}.{i}.gate_proj.weight"],
                                                             src[f"{p}.{i}.up_proj.weight"]]) for i in e])
        fused[f"{p}.down_proj"] = torch.stack([src[f"{p}.{i}.down_proj.weight"] for i in e])
    save_file({k: v.to(torch.bfloat16).contiguous() for k, v in fused.items()}, str(out / "model.safetensors"))
    index.write_text(json.dumps({"weight_map": {k: "model.safetensors" for k in fused}}))
    for name in ("pregate.safetensors", "aheadgate.safetensors"):
        if (model / name).is_file():
            shutil.copy(model / name, out / name)
    return out


def text_prompts(model: Path, n: int) -> tuple[list[int], list[int]]:
    """(measured prompt, planning prompt): two disjoint runs of `n` held-out text tokens."""
    tok = load_tokenizer(model)
    ids = [t for text in module_docstrings(HELD_OUT_MODULES) for t in tok.encode(text)]
    return ids[:n], ids[n:2 * n]


def prepare(args: argparse.Namespace) -> tuple[MoeShape, Path, Path]:
    if args.model is not None:
        return prepare_model(args)
    shape = QUICK if args.quick else MoeShape()
    if args.num_layers:
        shape = MoeShape(**{**shape.__dict__, "num_hidden_layers": args.num_layers})
    work = args.work_dir or HERE / "work" / f"moe_{'quick' if args.quick else 'full'}_{shape.num_hidden_layers}l"
    checkpoint = build_checkpoint(work / "checkpoint", shape)
    pack = work / "pack"
    if not (pack / "experts.json").is_file():
        write_pack(checkpoint, pack, overwrite=True)
    return shape, checkpoint, pack


def simulate_policies(args: argparse.Namespace, shape: MoeShape, store: ExpertStore,
                      budgets: list[float]) -> dict[str, dict[str, float]]:
    """Hit rates of every policy (Belady = upper bound) per budget, on the decode steps of the replayed
    recording (--replay), else of the synthetic trace."""
    if args.replay is not None:
        from moe_runs import first_layers

        from mixserve.experts.trace import RoutingTrace

        trace = first_layers(RoutingTrace.load(args.replay / "trace.npz"), list(store.layer_ids))
        trace.steps = trace.steps[1:]  # decode only: step 0 is the prompt
    else:
        cfg = SyntheticRoutingConfig(tuple(store.layer_ids), shape.num_experts, shape.num_experts_per_tok,
                                     zipf_alpha=args.zipf_alpha, stickiness=args.stickiness,
                                     affinity=args.affinity, seed=0)
        trace = SyntheticRouting(cfg).trace([1] * 512)
    slot = BudgetedExpertProvider.slot_sizes(store, __import__("torch").bfloat16)
    total = sum(slot.values()) * shape.num_experts
    out = {}
    for b in budgets:
        cap = plan_capacity(store.layer_ids, shape.num_experts, slot, int(b * total))
        out[f"{b:g}"] = {k: v.hit_rate for k, v in compare_policies(trace, cap).items()}
    return out


def replay_setup(args: argparse.Namespace, shape: MoeShape, base: dict[str, Any]) -> dict[str, Any]:
    """Check the recording fits this run (E, top-k, layers, token counts); the spec fields it sets."""
    meta = json.loads((args.replay / "meta.json").read_text())
    want = {"num_experts": shape.num_experts, "top_k": shape.num_experts_per_tok}
    for key, value in want.items():
        if meta.get(key) != value:
            raise SystemExit(f"{args.replay / 'meta.json'}: {key}={meta.get(key)}, the model has {value}")
    if meta["num_layers"] < shape.num_hidden_layers:
        raise SystemExit(f"{args.replay}: {meta['num_layers']} recorded layers < the model's {shape.num_hidden_layers}")
    if base["prefill_tokens"] != meta["prompt_tokens"] or \
            base["warmup_tokens"] + base["decode_tokens"] > meta["decode_tokens"]:
        raise SystemExit(f"{args.replay}: recorded {meta['prompt_tokens']} prompt + {meta['decode_tokens']} decode "
                         f"tokens; pass --prefill-tokens {meta['prompt_tokens']} and --warmup-tokens + "
                         f"--decode-tokens <= {meta['decode_tokens']}")
    return {"replay": str(args.replay), "plan_trace": str(args.replay / "plan_trace.npz")}


def child_cmd(spec: dict[str, Any]) -> list[str]:
    return [sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(spec)]


def run_one(spec: dict[str, Any], limit: int | None, files: list[Path], timeout_s: float) -> dict[str, Any]:
    drop_file_cache(files)
    t0 = time.perf_counter()
    res = run_limited(child_cmd(spec), limit, timeout_s)
    row: dict[str, Any] = {**{k: spec[k] for k in ("mode", "trace", "budget")}, "limit_bytes": limit,
                           "limited": res.limited, "limit_note": res.note, "cgroup_peak_bytes": res.max_usage_bytes,
                           "wall_s": time.perf_counter() - t0}
    lines = [ln for ln in res.stdout.splitlines() if ln.startswith("{")]
    if res.returncode != 0 or not lines:
        row["error"] = f"exit {res.returncode}: {res.stderr.strip().splitlines()[-1:]}"
    else:
        row.update(json.loads(lines[-1]))
    return row


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        from moe_runs import run

        print(json.dumps(run(json.loads(args.child))))
        return 0
    shape, checkpoint, pack = prepare(args)
    store = ExpertStore(pack, verify_checksums=False)
    expert_bytes = store.total_nbytes()
    dense_bytes = (pack / "model.safetensors").stat().st_size
    traces = (args.traces or ("real" if args.model else "replay" if args.replay else "zipf,real")).split(",")
    budgets = [float(b) for b in (args.budgets or ("0.25,0.5" if args.quick else "0.1,0.25,0.5,1.0")).split(",")]
    overhead = (args.overhead_mib or (384 if args.quick else 1024)) << 20
    base = dict(checkpoint=str(checkpoint), pack=str(pack), threads=args.threads, io_threads=args.io_threads,
                direct_io=not args.buffered_io, prefill_tokens=args.prefill_tokens or (32 if args.quick else 512),
                decode_tokens=args.decode_tokens or (16 if args.quick else 64), warmup_tokens=args.warmup_tokens,
                zipf_alpha=args.zipf_alpha, stickiness=args.stickiness, affinity=args.affinity, seed=0)
    slot = BudgetedExpertProvider.slot_sizes(store, __import__("torch").bfloat16)
    total_slots = sum(slot.values()) * shape.num_experts
    if args.model is not None:
        prompt, plan = text_prompts(args.model, base["prefill_tokens"])  # type: ignore[arg-type]
        base.update(prompt_ids=prompt, plan_prompt_ids=plan, plan_trace=str(pack.parent / "plan_trace.npz"))
    if args.replay is not None:
        base.update(replay_setup(args, shape, base))
    modes = args.modes.split(",")
    has_gate = args.replay is not None or (args.model is not None and (args.model / "aheadgate.safetensors").is_file())
    if not has_gate:
        modes = [m for m in modes if m != "gate"]  # needs the fitted gate of a real MoE folder
    rows = []
    for trace in traces:
        if "ram" in modes:
            rows.append(run_one({**base, "mode": "ram", "trace": trace, "budget": 1.0, "budget_bytes": total_slots},
                                None, [checkpoint, pack], args.timeout_s))
            print(json.dumps(rows[-1]), file=sys.stderr)
        for b in budgets:
            budget_bytes = int(b * total_slots)
            limit = budget_bytes + dense_bytes + overhead
            for mode in [m for m in modes if m != "ram"]:
                spec = {**base, "mode": mode, "trace": trace, "budget": b, "budget_bytes": budget_bytes}
                rows.append(run_one(spec, limit, [checkpoint, pack], args.timeout_s))
                print(json.dumps(rows[-1]), file=sys.stderr)
    sim = simulate_policies(args, shape, store, budgets)
    meta = {"shape": shape.__dict__, "simulated_trace": "replay" if args.replay else "synthetic",
            "expert_bytes": expert_bytes, "dense_bytes": dense_bytes,
            "overhead_bytes": overhead, "model": str(args.model) if args.model else None,
            **{k: v for k, v in base.items() if k not in ("checkpoint", "pack", "prompt_ids", "plan_prompt_ids")}}
    result = {"meta": meta, "rows": rows, "policy_simulation": sim,
              "targets": targets(rows, "real" if args.model else traces[0])}
    print_report(result)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    kind = args.model.name.replace(".", "p") if args.model else ("quick" if args.quick else "full")
    kind += "_replay" if args.replay else ""
    out = HERE / "results" / f"moe_{kind}_{stamp}"
    out.parent.mkdir(exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=1, default=lambda x: None))
    save_plot(result, out.with_suffix(".png"))
    print(f"wrote {out}.json and .png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
