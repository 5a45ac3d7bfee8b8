"""Edge–cloud split inference (CE-CoLLM) against cloud-only, edge-only and a naive split, over loopback.

    .venv/bin/python benchmarks/bench_edge.py                       # smollm2-135m, K=15, τ 0.6/0.8/0.9/1.0
    .venv/bin/python benchmarks/bench_edge.py --quick               # 3 prompts, 2 networks

The edge runs in this process; two cloud processes (layers [K, L), and the whole model for cloud-only)
listen on 127.0.0.1. Each emulated network is a user-space relay on loopback (benchmarks/netem_proxy.py:
per-direction delay rtt/2 and a bandwidth); `0:0` is plain loopback. No address but 127.0.0.1 is used.

Per network and mode, over arithmetic problems (chat template, greedy): latency per token (wall time /
tokens, summed over prompts), share of tokens decided at the edge, cloud compute per token (seconds the
cloud spent in its layers, and layer-positions) relative to cloud-only, link bytes per token, agreement
with the full model (each emitted token == the whole model's greedy token after the same context) and task
accuracy. Modes: cloud-only (prompt up once, tokens back), edge-only (exit head, no link), naive split
(whole context resent per deferral, τ = --naive-tau) and CE-CoLLM at each τ (context manager, fp16).
Writes benchmarks/results/edge_<stamp>.json and .png.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from mixserve.edge.api import CloudClient, load  # noqa: E402
from mixserve.edge.codec import Codec  # noqa: E402
from mixserve.edge.config import EdgeConfig  # noqa: E402
from mixserve.edge.edge import EdgeRunner  # noqa: E402
from mixserve.edge.exit_adapter import ExitAdapter  # noqa: E402
from mixserve.edge.frames import HEADER_BYTES, model_key  # noqa: E402
from mixserve.edge.link import websocket_connector  # noqa: E402
from mixserve.edge.stage import SequenceStage  # noqa: E402
from mixserve.models.base import as_causal_lm  # noqa: E402
from mixserve.scaling.tasks import get_task  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def start(cmd: list[str], ready: str) -> subprocess.Popen:
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, cwd=ROOT,
                            env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if ready not in line:
        proc.kill()
        raise RuntimeError(f"{cmd[:4]} did not start: {line!r}")
    return proc


def free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def cloud(args: argparse.Namespace, split: int) -> tuple[subprocess.Popen, int]:
    port = free_port()
    proc = start([sys.executable, "-m", "mixserve", "cloud", "--model", args.model, "--split-layer", str(split),
                  "--port", str(port), "--threads", str(args.threads)], "listening on")
    return proc, port


def relay(port: int, rtt_ms: float, mbit: float) -> tuple[subprocess.Popen | None, int]:
    if rtt_ms == 0 and mbit == 0:
        return None, port
    listen = free_port()
    proc = start([sys.executable, str(ROOT / "benchmarks" / "netem_proxy.py"), "--listen", str(listen),
                  "--target", str(port), "--rtt-ms", str(rtt_ms), "--mbit", str(mbit)], "ready")
    return proc, listen


class Reference:
    """The whole model in this process: greedy next tokens given any context (teacher forcing)."""

    def __init__(self, model: Any) -> None:
        self.model = model
        self.num_layers = model.kv_cache_spec().end

    @torch.inference_mode()
    def argmax_after(self, prompt: list[int], tokens: list[int]) -> list[int]:
        ids = prompt + tokens
        stage = SequenceStage(self.model, 0, self.num_layers, len(ids), torch.float32)
        logits = self.model.head(stage.forward(token_ids=ids)[len(prompt) - 1:])
        return logits.argmax(-1).tolist()[:len(tokens)]


def score(ref: Reference, task: Any, problems: list[Any], prompts: list[list[int]], outs: list[list[int]],
          tokenizer: Any, full: list[list[int]] | None) -> dict[str, float]:
    agree = total = exact = correct = 0
    for problem, prompt, out, i in zip(problems, prompts, outs, range(len(outs))):
        want = ref.argmax_after(prompt, out)
        agree += sum(a == b for a, b in zip(out, want))
        total += len(out)
        exact += full is not None and out == full[i]
        correct += task.check(problem, task.extract(tokenizer.decode(out)))
    return {"agreement": agree / max(total, 1), "sequence_match": exact / len(outs), "accuracy": correct / len(outs)}


class Mode:
    """One way to produce tokens, with what it produced so far over the prompts of one network."""

    def __init__(self, name: str, tau: float | None, generate: Any, stats: CloudClient | None,
                 cloud_layers: int) -> None:
        self.name, self.tau, self.generate, self.stats, self.cloud_layers = name, tau, generate, stats, cloud_layers
        self.outs: list[list[int]] = []
        self.times: list[float] = []
        self.sources: list[str] = []
        self.bytes = 0
        self.cloud_s = 0.0
        self.positions = 0

    def run(self, ids: list[int]) -> None:
        before = self.stats.stats() if self.stats is not None else None
        t0 = time.perf_counter()
        out, sources, nbytes = self.generate(ids)
        self.times.append(time.perf_counter() - t0)
        if before is not None and self.stats is not None:
            after = self.stats.stats()
            self.cloud_s += after["compute_seconds"] - before["compute_seconds"]
            self.positions += after["num_computed_positions"] - before["num_computed_positions"]
        self.outs.append(out)
        self.sources += sources
        self.bytes += nbytes


def edge_mode(name: str, model: Any, cfg: dict, tok: Any, args: argparse.Namespace, tau: float, url: str | None,
              stats: CloudClient | None, naive: bool = False, head: Any = None) -> tuple[Mode, EdgeRunner]:
    config = EdgeConfig(split_layer=args.split_layer, exit_threshold=tau, codec=Codec.parse(args.codec),
                        cloud_timeout_s=60.0, naive=naive, max_len=1024)
    edge = EdgeRunner(model, cfg, config, None if url is None else websocket_connector(url, 30.0), torch.float32,
                      tuple(tok.eos_token_ids), exit_head=head)

    def generate(ids: list[int]) -> tuple[list[int], list[str], int]:
        r = edge.generate(ids, args.max_tokens)
        return r.token_ids, r.sources, r.usage["link_bytes_sent"] + r.usage["link_bytes_received"]

    num_layers = model.kv_cache_spec().end
    return Mode(name, tau, generate, stats, num_layers - args.split_layer), edge


def measure(args: argparse.Namespace) -> dict[str, Any]:
    torch.set_num_threads(args.threads)
    loaded = load(args.model, num_threads=args.threads)
    model, cfg, tok = as_causal_lm(loaded.model), loaded.checkpoint.hf_config, loaded.checkpoint.tokenizer
    num_layers = model.kv_cache_spec().end
    head = None if args.exit_adapter is None else ExitAdapter.load(args.exit_adapter, model, cfg, args.split_layer)
    task = get_task("arithmetic")
    problems = task.generate(args.num_prompts, seed=0, difficulty=1)
    prompts = [tok.encode_chat([{"role": "user", "content": p.question}]) for p in problems]
    ref = Reference(model)
    clouds = [cloud(args, args.split_layer), cloud(args, 0)]
    rows: list[dict[str, Any]] = []
    try:
        split_port, whole_port = clouds[0][1], clouds[1][1]
        split_stats = CloudClient(f"ws://127.0.0.1:{split_port}", model_key(cfg, args.split_layer))
        whole_stats = CloudClient(f"ws://127.0.0.1:{whole_port}", model_key(cfg, 0))
        for net in args.networks:
            rtt, mbit = (float(x) for x in net.split(":"))
            relays = [relay(split_port, rtt, mbit), relay(whole_port, rtt, mbit)]
            split_url, whole_url = (f"ws://127.0.0.1:{p}" for _, p in relays)
            client = CloudClient(whole_url, model_key(cfg, 0))
            runners: list[EdgeRunner] = []

            def cloud_only(ids: list[int], client: CloudClient = client) -> tuple[list[int], list[str], int]:
                out = client.generate(ids, args.max_tokens)  # GENERATE up, TOKENS back: 4 bytes per id
                return out, ["cloud"] * len(out), 2 * HEADER_BYTES + 4 * (len(ids) + len(out))

            modes = [Mode("cloud-only", None, cloud_only, whole_stats, num_layers)]
            specs = [("edge-only", 0.0, None, False, None), ("naive", args.naive_tau, split_url, True, None)]
            specs += [("ce-collm", t, split_url, False, None) for t in args.taus]
            if head is not None:
                specs += [("ce+adapter", t, split_url, False, head) for t in args.adapter_taus]
                specs += [("edge+adapter", 0.0, None, False, head)]
            for name, tau, url, naive, h in specs:
                mode, runner = edge_mode(name, model, cfg, tok, args, tau, url,
                                         None if url is None else split_stats, naive, h)
                modes.append(mode)
                runners.append(runner)
            try:
                for ids in prompts:  # modes interleaved per prompt: load bursts hit every mode alike
                    for mode in modes:
                        mode.run(ids)
            finally:
                client.close()
                for runner in runners:
                    runner.close()
                for proc, _ in relays:
                    if proc is not None:
                        proc.kill()
            full = modes[0].outs
            for mode in modes:
                rows.append({**row(net, mode), **score(ref, task, problems, prompts, mode.outs, tok, full)})
                print(fmt(rows[-1], rows), flush=True)
    finally:
        for proc, _ in clouds:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
    cloud_only = {r["network"]: r for r in rows if r["mode"] == "cloud-only"}
    for r in rows:
        base = cloud_only[r["network"]]
        r["latency_vs_cloud"] = r["latency_ms_per_token"] / base["latency_ms_per_token"]
        r["cloud_work_vs_cloud"] = r["cloud_layer_positions_per_token"] / base["cloud_layer_positions_per_token"]
        r["cloud_seconds_vs_cloud"] = r["cloud_ms_per_token"] / base["cloud_ms_per_token"]
    return {"model": args.model, "split_layer": args.split_layer, "num_layers": num_layers, "codec": args.codec,
            "num_prompts": len(prompts), "max_tokens": args.max_tokens, "threads": args.threads,
            "exit_adapter": args.exit_adapter, "rows": rows}


def row(net: str, mode: Mode) -> dict[str, Any]:
    tokens = sum(map(len, mode.outs))
    return {"network": net, "mode": mode.name, "tau": mode.tau, "tokens": tokens,
            "latency_ms_per_token": 1000 * sum(mode.times) / tokens,
            "latency_ms_per_token_median": 1000 * statistics.median(t / max(len(o), 1)
                                                                     for t, o in zip(mode.times, mode.outs)),
            "edge_share": sum(s != "cloud" for s in mode.sources) / max(len(mode.sources), 1),
            "cloud_ms_per_token": 1000 * mode.cloud_s / tokens,
            "cloud_layer_positions_per_token": mode.positions * mode.cloud_layers / tokens,
            "bytes": mode.bytes, "bytes_per_token": mode.bytes / tokens}


HEAD = (f"{'network':>8} {'mode':>10} {'tau':>4} {'ms/tok':>7} {'vs cloud':>8} {'edge%':>6} {'cloud ms/tok':>12} "
        f"{'cloud work':>10} {'B/tok':>7} {'agree':>6} {'seq=':>5} {'acc':>5}")


def fmt(r: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    base = next(b for b in rows if b["network"] == r["network"] and b["mode"] == "cloud-only")
    tau = "" if r["tau"] is None else f"{r['tau']:.1f}"
    bpt = "-" if r["bytes"] is None else f"{r['bytes_per_token']:.0f}"
    work = r["cloud_layer_positions_per_token"] / max(base["cloud_layer_positions_per_token"], 1e-9)
    return (f"{r['network']:>8} {r['mode']:>10} {tau:>4} {r['latency_ms_per_token']:7.1f} "
            f"{r['latency_ms_per_token'] / base['latency_ms_per_token']:8.2f} {100 * r['edge_share']:6.1f} "
            f"{r['cloud_ms_per_token']:12.2f} "
            f"{work:10.2f} {bpt:>7} "
            f"{r['agreement']:6.3f} {r['sequence_match']:5.2f} {r['accuracy']:5.2f}")


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    nets = list(dict.fromkeys(r["network"] for r in rows))
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    ce0 = [r for r in rows if r["mode"] == "ce-collm" and r["network"] == nets[0]]
    taus = [r["tau"] for r in ce0]
    axes[0].plot(taus, [r["edge_share"] for r in ce0], "o-", label="share decided at the edge")
    axes[0].plot(taus, [r["agreement"] for r in ce0], "s-", label="agreement with the full model")
    axes[0].plot(taus, [r["accuracy"] for r in ce0], "^-", label="task accuracy")
    ad0 = [r for r in rows if r["mode"] == "ce+adapter" and r["network"] == nets[0]]
    if ad0:
        axes[0].plot([r["tau"] for r in ad0], [r["edge_share"] for r in ad0], "o", mfc="none", ms=9, c="C0",
                     label="edge share, fitted exit adapter")
        axes[0].plot([r["tau"] for r in ad0], [r["agreement"] for r in ad0], "s", mfc="none", ms=9, c="C1",
                     label="agreement, fitted exit adapter")
    full_acc = next(r["accuracy"] for r in rows if r["mode"] == "cloud-only")
    axes[0].axhline(full_acc, ls=":", c="gray", label="cloud-only accuracy")
    axes[0].set(xlabel="exit threshold τ", title="exit rate, agreement, accuracy", ylim=(0, 1.05))
    axes[0].legend(fontsize=7)
    for i, net in enumerate(nets):
        ce = [r for r in rows if r["mode"] == "ce-collm" and r["network"] == net]
        c = f"C{i}"
        axes[1].plot([r["tau"] for r in ce], [r["latency_ms_per_token"] for r in ce], "o-", c=c, label=f"CE {net}")
        base = next(r for r in rows if r["mode"] == "cloud-only" and r["network"] == net)
        axes[1].axhline(base["latency_ms_per_token"], ls="--", c=c, lw=0.8, label=f"cloud-only {net}")
        naive = next(r for r in rows if r["mode"] == "naive" and r["network"] == net)
        axes[1].plot([naive["tau"]], [naive["latency_ms_per_token"]], "x", c=c, ms=10, label=f"naive {net}")
        axes[2].plot([r["tau"] for r in ce], [r["cloud_seconds_vs_cloud"] for r in ce], "o-", c=c, label=net)
    edge = next(r for r in rows if r["mode"] == "edge-only")
    axes[1].axhline(edge["latency_ms_per_token"], ls=":", c="k", label="edge-only")
    axes[1].set(xlabel="exit threshold τ", ylabel="ms per token", title="latency per token (rtt ms:Mbit/s)")
    axes[1].legend(fontsize=6, ncol=2, loc="upper left")
    ce_all = [r for r in rows if r["mode"] == "ce-collm" and r["network"] == nets[0]]
    axes[2].plot([r["tau"] for r in ce_all], [r["cloud_work_vs_cloud"] for r in ce_all], "k^--",
                 label="layer-positions (exact)")
    axes[2].axhline(0.4, ls=":", c="gray", label="target 0.4")
    axes[2].set(xlabel="exit threshold τ", ylabel="cloud work / cloud-only", title="cloud compute per token")
    axes[2].legend(fontsize=7)
    fig.suptitle(f"{result['model']} split at layer {result['split_layer']}/{result['num_layers']}, "
                 f"{result['codec']} transfer, {result['num_prompts']} prompts x <= {result['max_tokens']} tokens")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--split-layer", type=int, default=15)
    p.add_argument("--taus", type=lambda s: [float(x) for x in s.split(",")], default=[0.6, 0.8, 0.9, 1.0])
    p.add_argument("--naive-tau", type=float, default=0.8)
    p.add_argument("--networks", type=lambda s: s.split(","), default=["0:0", "20:100", "20:10", "80:10"],
                   help="rtt_ms:mbit pairs; 0:0 is plain loopback")
    p.add_argument("--codec", default="fp16", choices=["fp32", "fp16", "int8"])
    p.add_argument("--num-prompts", type=int, default=6)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--threads", type=int, default=1, help="torch threads of the edge and of each cloud")
    p.add_argument("--exit-adapter", default=None, help="also run the edge with this fitted exit adapter")
    p.add_argument("--adapter-taus", type=lambda s: [float(x) for x in s.split(",")], default=[0.8, 0.9])
    p.add_argument("--quick", action="store_true")
    args = p.parse_args()
    if args.quick:
        args.num_prompts, args.networks, args.max_tokens = 3, ["0:0", "20:10"], 24
    print(HEAD, flush=True)
    result = measure(args)
    RESULTS.mkdir(exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out = RESULTS / f"edge_{stamp}.json"
    out.write_text(json.dumps({**result, "command": " ".join(sys.argv)}, indent=1))
    plot(result, out.with_suffix(".png"))
    print(f"wrote {out} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
