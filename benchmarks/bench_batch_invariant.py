"""What batch-invariant mode costs: prefill, single-stream decode and 16-stream decode, default vs
`batch_invariant=True`, same model, same run (modes interleaved, medians of `--repeats`).

    .venv/bin/python benchmarks/bench_batch_invariant.py                      # SmolLM2-135M (GGUF, int4)
    .venv/bin/python benchmarks/bench_batch_invariant.py --model gemma3-270m --repeats 3

Prints a table, writes benchmarks/results/batch_invariant_<model>.json and .png.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from mixserve import LLM, SamplingParams  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"


def measure(llm: LLM, prompt_len: int, decode_tokens: int) -> dict[str, float]:
    prompt = list(range(1000, 1000 + prompt_len))
    start = time.perf_counter()
    llm.generate([prompt], SamplingParams(max_tokens=1, temperature=0))
    prefill = prompt_len / (time.perf_counter() - start)
    one = SamplingParams(max_tokens=decode_tokens, temperature=0, ignore_eos=True)
    start = time.perf_counter()
    llm.generate([[1, 2, 3, 4]], one)
    single = decode_tokens / (time.perf_counter() - start)
    prompts = [[1, 2, 3, 4 + i] for i in range(16)]
    start = time.perf_counter()
    llm.generate(prompts, one)
    batch = 16 * decode_tokens / (time.perf_counter() - start)
    return {"prefill_tok_s": prefill, "decode_1_tok_s": single, "decode_16_tok_s": batch}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt-len", type=int, default=256)
    ap.add_argument("--decode-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    llms = {mode: LLM(args.model, batch_invariant=mode, num_threads=args.threads, enable_prefix_caching=False)
            for mode in (False, True)}
    runs: dict[bool, list[dict[str, float]]] = {False: [], True: []}
    for llm in llms.values():
        measure(llm, 32, 4)  # warm-up
    for i in range(args.repeats):
        for mode, llm in llms.items():
            runs[mode].append(measure(llm, args.prompt_len, args.decode_tokens))
            print(f"[bench] repeat {i + 1}/{args.repeats} {'invariant' if mode else 'default'}: {runs[mode][-1]}")
    keys = list(runs[False][0])
    med = {mode: {k: statistics.median(r[k] for r in rs) for k in keys} for mode, rs in runs.items()}
    print(f"\n{args.model}, {args.threads} threads, medians of {args.repeats}")
    print(f"{'metric':<18} {'default':>10} {'invariant':>10} {'ratio':>7}")
    for k in keys:
        print(f"{k:<18} {med[False][k]:>10.1f} {med[True][k]:>10.1f} {med[True][k] / med[False][k]:>7.2f}")
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = RESULTS / f"batch_invariant_{Path(args.model).stem}"
    stem.with_suffix(".json").write_text(json.dumps({"args": vars(args), "runs": {str(k): v for k, v in runs.items()},
                                                     "median": {str(k): v for k, v in med.items()}}, indent=2))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    xs = range(len(keys))
    ax.bar([x - 0.2 for x in xs], [med[False][k] for k in keys], 0.4, label="default")
    ax.bar([x + 0.2 for x in xs], [med[True][k] for k in keys], 0.4, label="batch-invariant")
    ax.set_xticks(list(xs), [k.replace("_tok_s", "") for k in keys])
    ax.set_ylabel("tokens / s")
    ax.set_title(f"{args.model}: cost of batch-invariant mode")
    ax.legend()
    fig.tight_layout()
    fig.savefig(stem.with_suffix(".png"), dpi=120)
    print(f"[bench] wrote {stem}.json and .png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
