"""Constrained decoding overhead: token-mask time of llguidance and xgrammar on our vocabularies, and
mixserve decode with vs without a JSON-schema constraint (single stream and n samples).

    .venv/bin/python benchmarks/bench_structured.py                    # both models
    .venv/bin/python benchmarks/bench_structured.py --models smollm2-135m --tokens 48 --repeats 3
    .venv/bin/python benchmarks/bench_structured.py --skip-decode        # mask times only (fast)

1. Mask time per step, per library (each built from the model's own tokenizer: llguidance from its
   tokenizer.json, xgrammar through a transformers wrapper of the same tokenizer): the schema's JSON
   text is replayed token by token; each step fills the next-token bitmask then consumes the token.
   Batch 1 and batch n (n independent matchers: llguidance row by row as the runner does, and with its
   thread pool (`_pool`); xgrammar's batch fill).
2. End to end, in this process: mixserve generation of `--tokens` tokens with temperature 0.8, with and
   without the constraint. The schema (an array of at least 1000 integers) never completes within
   the budget, so both runs produce exactly `--tokens` tokens per sample. Per-step time = (wall of the
   run - wall of a 1-token run) / (tokens - 1): decode only, as the llama.cpp peer is timed.

Medians of --repeats runs. Writes benchmarks/results/structured_<stamp>.json and .png.
3. The peer, in the same run: llama.cpp (its venv in .peers/llamacpp, `bash benchmarks/setup_peers.sh
   llamacpp`) on the model's GGUF, single stream, with and without the same schema as a grammar
   (benchmarks/peers/llamacpp_grammar.py). Skipped with a message when the peer is not installed.
xgrammar is skipped with a message when it is not installed.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
RESULTS = Path(__file__).resolve().parent / "results"
sys.path.insert(0, str(Path(__file__).resolve().parent))

LONG_SCHEMA = {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 100000}, "minItems": 1000}
"""Never finishes within the token budget: constrained and free runs produce equally many tokens."""
MASK_SCHEMA = {"type": "object", "properties": {
    "name": {"type": "string"}, "age": {"type": "integer", "minimum": 0},
    "tags": {"type": "array", "items": {"enum": ["red", "green", "blue"]}},
    "address": {"type": "object", "properties": {"city": {"type": "string"}, "zip": {"type": "string",
                                                                                         "pattern": "[0-9]{5}"}}}},
    "required": ["name", "age"]}
MASK_TEXT = ('{"name": "Ada Lovelace", "age": 36, "tags": ["red", "blue", "green"], '
             '"address": {"city": "London", "zip": "12345"}}')


def mask_times_llguidance(tok: Any, vocab: int, eos: list[int], ids: list[int], batch: int,
                          parallel: bool = False) -> dict[str, float]:
    import llguidance
    import torch

    from mixserve.structured.spec import StructuredOutput
    t0 = time.perf_counter()
    lt = llguidance.LLTokenizer(tok.backend.to_str(), n_vocab=vocab, eos_token=eos)
    setup = time.perf_counter() - t0
    grammar = StructuredOutput(json=MASK_SCHEMA).compiled
    t0 = time.perf_counter()
    start = llguidance.LLMatcher(lt, grammar, log_level=0)
    compile_s = time.perf_counter() - t0
    executor = llguidance.LLExecutor()
    matchers = [start.deep_copy() for _ in range(batch)]
    words = (vocab + 31) // 32
    bitmask = torch.empty(batch, words, dtype=torch.int32)
    steps = []
    for token in ids:
        t0 = time.perf_counter()
        if parallel:
            executor.unsafe_compute_mask_ptr([(m, i) for i, m in enumerate(matchers)], bitmask.data_ptr(),
                                             words * 4, batch)
        else:  # row by row on this thread, as mixserve's runner does
            for i, m in enumerate(matchers):
                m.unsafe_compute_mask_ptr(bitmask[i].data_ptr(), words * 4)
        for m in matchers:
            assert m.consume_token(token), m.get_error()
        steps.append(time.perf_counter() - t0)
    return {"tokenizer_s": setup, "compile_s": compile_s, "median_ms": 1e3 * statistics.median(steps),
            "max_ms": 1e3 * max(steps), "mean_ms": 1e3 * statistics.fmean(steps)}


def mask_times_xgrammar(tok: Any, vocab: int, eos: list[int], ids: list[int], batch: int) -> dict[str, float] | None:
    try:
        import xgrammar as xgr
        from transformers import PreTrainedTokenizerFast
    except ImportError as exc:
        print(f"  xgrammar skipped: {exc}")
        return None
    t0 = time.perf_counter()
    info = xgr.TokenizerInfo.from_huggingface(PreTrainedTokenizerFast(tokenizer_object=tok.backend),
                                              vocab_size=vocab, stop_token_ids=eos)
    compiler = xgr.GrammarCompiler(info, cache_enabled=False)
    setup = time.perf_counter() - t0
    t0 = time.perf_counter()
    compiled = compiler.compile_json_schema(json.dumps(MASK_SCHEMA), any_whitespace=False)
    compile_s = time.perf_counter() - t0
    matchers = [xgr.GrammarMatcher(compiled) for _ in range(batch)]
    bitmask = xgr.allocate_token_bitmask(batch, vocab)
    batch_matcher = xgr.BatchGrammarMatcher() if batch > 1 and hasattr(xgr, "BatchGrammarMatcher") else None
    steps = []
    for token in ids:
        t0 = time.perf_counter()
        if batch_matcher is not None:
            batch_matcher.batch_fill_next_token_bitmask(matchers, bitmask)
        else:
            for i, m in enumerate(matchers):
                m.fill_next_token_bitmask(bitmask, i)
        for m in matchers:
            assert m.accept_token(token)
        steps.append(time.perf_counter() - t0)
    return {"tokenizer_s": setup, "compile_s": compile_s, "median_ms": 1e3 * statistics.median(steps),
            "max_ms": 1e3 * max(steps), "mean_ms": 1e3 * statistics.fmean(steps)}


def decode_times(llm: Any, n: int, tokens: int, repeats: int) -> dict[str, float]:
    from mixserve import SamplingParams
    from mixserve.structured import StructuredOutput
    prompt = llm.chat_prompt([{"role": "user", "content": "List many numbers as a JSON array."}])
    out: dict[str, float] = {}
    for name, structured in (("free", None), ("json_schema", StructuredOutput(json=LONG_SCHEMA))):
        params = SamplingParams(n=n, temperature=0.8, seed=0, max_tokens=tokens, structured=structured,
                                ignore_eos=structured is None)
        llm.generate(prompt, SamplingParams(n=n, temperature=0.8, max_tokens=4, structured=structured))  # warm
        one = SamplingParams(n=n, temperature=0.8, seed=0, max_tokens=1, structured=structured,
                             ignore_eos=structured is None)
        runs = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            llm.generate(prompt, one)  # prefill + first token, subtracted: the peer also times decode only
            t1 = time.perf_counter()
            result = llm.generate(prompt, params)[0]
            elapsed = time.perf_counter() - t1 - (t1 - t0)
            generated = sum(len(o.token_ids) for o in result.outputs)
            assert generated == n * tokens, (name, generated)
            runs.append(elapsed / (tokens - 1))  # per decode step (all n samples advance together)
        out[f"{name}_ms_per_step"] = 1e3 * statistics.median(runs)
    out["overhead_pct"] = 100 * (out["json_schema_ms_per_step"] / out["free_ms_per_step"] - 1)
    return out


def llamacpp_grammar(model: str, prompt: str, args: argparse.Namespace) -> dict[str, Any] | None:
    """The llama.cpp peer's per-step time with and without the schema as a grammar (single stream)."""
    import subprocess
    import tempfile

    from bench_engine import MODELS, PEERS_DIR, resolve_gguf
    python = PEERS_DIR / "llamacpp" / "bin" / "python"
    if not python.exists():
        print(f"llama.cpp peer not installed ({python} missing; run: bash benchmarks/setup_peers.sh llamacpp)")
        return None
    gguf = resolve_gguf(MODELS[model])
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(LONG_SCHEMA, f)
    cmd = [str(python), str(Path(__file__).resolve().parent / "peers" / "llamacpp_grammar.py"), "--model",
           str(gguf), "--schema", f.name, "--prompt", prompt, "--tokens", str(args.tokens),
           "--repeats", str(args.repeats), "--threads", str(args.threads)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    if proc.returncode != 0:
        print(f"llama.cpp peer failed: {proc.stderr[-2000:]}")
        return None
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["smollm2-135m", "gemma3-270m"])
    parser.add_argument("--n", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--skip-decode", action="store_true", help="only the mask-time part")
    parser.add_argument("--no-peer", action="store_true", help="do not run the llama.cpp grammar peer")
    args = parser.parse_args()
    from mixserve.llm import LLM
    report: dict[str, Any] = {"args": vars(args), "models": {}}
    for model in args.models:
        print(f"== {model}")
        llm = LLM(model, num_threads=args.threads, kv_cache_bytes=1 << 28, max_model_len=1024)
        tok = llm.tokenizer
        vocab = llm.engine.info.vocab_size
        eos = list(tok.eos_token_ids)
        ids = tok.encode(MASK_TEXT, add_special_tokens=False)
        entry: dict[str, Any] = {"vocab_size": vocab, "mask": {}, "decode": {}}
        for batch in (1, args.n):
            entry["mask"][f"llguidance_b{batch}"] = mask_times_llguidance(tok, vocab, eos, ids, batch)
            if batch > 1:
                entry["mask"][f"llguidance_pool_b{batch}"] = mask_times_llguidance(tok, vocab, eos, ids, batch, True)
            entry["mask"][f"xgrammar_b{batch}"] = mask_times_xgrammar(tok, vocab, eos, ids, batch)
        for n in () if args.skip_decode else (1, args.n):
            entry["decode"][f"n{n}"] = decode_times(llm, n, args.tokens, args.repeats)
        if not (args.skip_decode or args.no_peer):
            prompt = llm.chat_prompt([{"role": "user", "content": "List many numbers as a JSON array."}])
            peer = llamacpp_grammar(model, prompt, args)
            if peer is not None:
                entry["decode"]["llama.cpp n1"] = peer
        report["models"][model] = entry
        _print(model, entry)
    RESULTS.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path = RESULTS / f"structured_{stamp}.json"
    path.write_text(json.dumps(report, indent=2))
    _plot(report, path.with_suffix(".png"))
    print(f"wrote {path}")
    return 0


def _print(model: str, entry: dict[str, Any]) -> None:
    print(f"{'library/batch':<18} {'tokenizer s':>11} {'compile s':>10} {'mask median ms':>15} {'mask max ms':>12}")
    for name, m in entry["mask"].items():
        if m is not None:
            print(f"{name:<18} {m['tokenizer_s']:>11.3f} {m['compile_s']:>10.4f} {m['median_ms']:>15.4f} "
                  f"{m['max_ms']:>12.3f}")
    print(f"{'decode':<8} {'free ms/step':>13} {'json ms/step':>13} {'overhead %':>11}")
    for name, d in entry["decode"].items():
        print(f"{name:<8} {d['free_ms_per_step']:>13.2f} {d['json_schema_ms_per_step']:>13.2f} "
              f"{d['overhead_pct']:>11.1f}")


def _plot(report: dict[str, Any], path: Path) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(7, 4))
    labels, free, constrained = [], [], []
    if not any(entry["decode"] for entry in report["models"].values()):
        return
    for model, entry in report["models"].items():
        for name, d in entry["decode"].items():
            labels.append(f"{model}\n{name}")
            free.append(d["free_ms_per_step"])
            constrained.append(d["json_schema_ms_per_step"])
    x = range(len(labels))
    ax.bar([i - 0.2 for i in x], free, 0.4, label="unconstrained")
    ax.bar([i + 0.2 for i in x], constrained, 0.4, label="JSON schema (llguidance / llama.cpp grammar)")
    ax.set_xticks(list(x), labels)
    ax.set_ylabel("ms per decode step")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)


if __name__ == "__main__":
    raise SystemExit(main())
