"""Tables, targets and the plot of the MoE budget benchmark."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

MODES = ("ram", "mmap", "ondemand", "lru", "lookahead", "gate", "ours")


def _find(rows: list[dict[str, Any]], mode: str, trace: str, budget: float | None) -> dict[str, Any] | None:
    for r in rows:
        if r["mode"] == mode and r["trace"] == trace and (budget is None or r["budget"] == budget) \
                and "error" not in r:
            return r
    return None


def _metric(row: dict[str, Any] | None, phase: str) -> float:
    return float(row[phase]["tok_s"]) if row is not None else math.nan


def targets(rows: list[dict[str, Any]], trace: str = "zipf") -> list[dict[str, Any]]:
    """The issue's targets for `ours` (and `gate` where it ran): decode at 50% on `trace` vs ram (0.8x),
    ondemand and mmap (2x); prefill at 25% vs mmap (1x), on every trace."""
    out = []
    for mode in [m for m in ("ours", "gate") if any(r["mode"] == m for r in rows)]:
        ours50 = _find(rows, mode, trace, 0.5)
        for ref_mode, budget, need in (("ram", None, 0.8), ("ondemand", 0.5, 2.0), ("mmap", 0.5, 2.0)):
            ref = _find(rows, ref_mode, trace, budget)
            ratio = _metric(ours50, "decode") / _metric(ref, "decode")
            out.append({"name": f"decode {trace} 50%: {mode} / {ref_mode}", "ratio": ratio, "need": need,
                        "met": ratio >= need})
        for tr in sorted({r["trace"] for r in rows}):
            ratio = _metric(_find(rows, mode, tr, 0.25), "prefill") / _metric(_find(rows, "mmap", tr, 0.25),
                                                                            "prefill")
            out.append({"name": f"prefill {tr} 25%: {mode} / mmap", "ratio": ratio, "need": 1.0,
                        "met": ratio >= 1.0})
    return out


def _fmt(v: Any, spec: str) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


def print_report(result: dict[str, Any]) -> None:
    meta = result["meta"]
    print(f"\nMoE under a memory budget: {meta['shape']}; experts {meta['expert_bytes'] / 2**30:.2f} GiB, "
          f"dense {meta['dense_bytes'] / 2**30:.2f} GiB; prefill {meta['prefill_tokens']} tokens, decode "
          f"{meta['decode_tokens']}; O_DIRECT={meta['direct_io']}")
    head = (f"{'trace':<5} {'budget':>6} {'mode':<8} {'limit GiB':>9} {'decode t/s':>10} {'prefill t/s':>11} "
            f"{'hit':>5} {'MB/tok':>8} {'disk MB/tok':>11} {'stall':>5} {'recall':>6}")
    print(head)
    print("-" * len(head))
    for r in result["rows"]:
        if "error" in r:
            print(f"{r['trace']:<5} {r['budget']:>6g} {r['mode']:<8} ERROR {r['error']}")
            continue
        d, p = r["decode"], r["prefill"]
        limit = "-" if not r["limited"] else f"{r['limit_bytes'] / 2**30:.2f}"
        print(f"{r['trace']:<5} {r['budget']:>6g} {r['mode']:<8} {limit:>9} {d['tok_s']:>10.2f} {p['tok_s']:>11.1f} "
              f"{_fmt(d.get('hit_rate'), '.2f'):>5} {_fmt(d.get('bytes_per_token', math.nan) / 1e6, '.1f'):>8} "
              f"{d['disk_bytes_per_token'] / 1e6:>11.1f} {_fmt(d.get('stall_share'), '.2f'):>5} "
              f"{_fmt(d.get('recall'), '.2f'):>6}")
    notes = {r["limit_note"] for r in result["rows"] if r.get("limit_bytes") and not r["limited"]}
    for note in notes:
        print(f"NOTE: memory limit NOT applied: {note}")
    print(f"\nOffline policy simulation (decode, {meta.get('simulated_trace', 'synthetic')} trace, per-layer capacity "
          f"from the budget): hit rate")
    names = ("lru", "lfu", "lfru", "belady")
    print(f"{'budget':>6} " + " ".join(f"{n:>7}" for n in names))
    for budget, rates in result["policy_simulation"].items():
        print(f"{budget:>6} " + " ".join(f"{rates[n]:>7.3f}" for n in names))
    print("\nTargets")
    for t in result["targets"]:
        print(f"  {t['name']:<34} {_fmt(t['ratio'], '.2f'):>6}x (need >= {t['need']}x) "
              f"{'met' if t['met'] else 'MISSED'}")


def save_plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in result["rows"] if "error" not in r]
    traces = sorted({r["trace"] for r in rows})
    fig, axes = plt.subplots(len(traces), 3, figsize=(15, 4 * len(traces)), squeeze=False)
    for i, trace in enumerate(traces):
        for mode in MODES:
            pts = sorted((r["budget"], r) for r in rows if r["trace"] == trace and r["mode"] == mode)
            if not pts:
                continue
            xs = [b * 100 for b, _ in pts]
            style = "--" if mode == "ram" else "-o"
            if mode == "ram":
                xs, pts = [10, 100], pts * 2
            axes[i][0].plot(xs, [r["decode"]["tok_s"] for _, r in pts], style, label=mode)
            axes[i][1].plot(xs, [r["prefill"]["tok_s"] for _, r in pts], style, label=mode)
            if mode in ("lru", "gate", "ours"):
                axes[i][2].plot(xs, [r["decode"]["hit_rate"] for _, r in pts], "-o", label=mode)
        for j, title in enumerate(("decode tok/s", "prefill tok/s", "decode hit rate")):
            axes[i][j].set_title(f"{title} ({trace} routing)")
            axes[i][j].set_xlabel("expert budget (% of expert bytes)")
            axes[i][j].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
