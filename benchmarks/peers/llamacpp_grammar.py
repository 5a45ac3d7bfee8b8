"""llama.cpp grammar peer: per-token decode time with and without a JSON-schema grammar, single stream.

    .peers/llamacpp/bin/python benchmarks/peers/llamacpp_grammar.py --model X.gguf --schema S.json \
        --prompt "..." --tokens 64 --repeats 3 --threads 2

The schema is turned into a GBNF grammar by llama-cpp-python (`LlamaGrammar.from_json_schema`), and
`Llama.generate` applies it as llama.cpp's grammar sampler. Both runs sample at temperature 0.8 with the
other samplers off and stop after exactly `--tokens` tokens (the benchmark's schema never completes within
that budget, so the constrained run does not end early). Prints one JSON object on stdout.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("--schema", required=True, help="a JSON schema file")
    p.add_argument("--prompt", required=True)
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    import llama_cpp
    from llama_cpp import Llama, LlamaGrammar

    llm = Llama(model_path=args.model, n_ctx=args.tokens + 512, n_threads=args.threads,
                n_threads_batch=args.threads, seed=0, verbose=False)
    with open(args.schema) as f:
        schema_text = f.read()
    t0 = time.perf_counter()
    grammar = LlamaGrammar.from_json_schema(schema_text, verbose=False)
    compile_s = time.perf_counter() - t0
    prompt = llm.tokenize(args.prompt.encode(), add_bos=True, special=True)
    sampling = dict(temp=0.8, top_k=0, top_p=1.0, min_p=0.0, typical_p=1.0, repeat_penalty=1.0)

    def run(constrained: bool, tokens: int) -> tuple[float, str]:
        """Seconds per decode step (prefill excluded: timing starts at the first token) and the text."""
        llm.reset()
        ids: list[int] = []
        first = 0.0
        for token in llm.generate(prompt, grammar=grammar if constrained else None, **sampling):
            if not ids:
                first = time.perf_counter()
            ids.append(token)
            if len(ids) == tokens:
                break
        elapsed = time.perf_counter() - first
        return elapsed / max(1, len(ids) - 1), llm.detokenize(ids).decode(errors="replace")

    run(False, 4)
    run(True, 4)
    out: dict[str, object] = {"engine": f"llama-cpp-python {llama_cpp.__version__}", "grammar_compile_s": compile_s}
    for name, constrained in (("free", False), ("json_schema", True)):
        times, text = [], ""
        for _ in range(args.repeats):
            s, text = run(constrained, args.tokens)
            times.append(s)
        out[f"{name}_ms_per_step"] = 1e3 * statistics.median(times)
        out[f"{name}_sample"] = text[:120]
    out["overhead_pct"] = 100 * (float(out["json_schema_ms_per_step"]) / float(out["free_ms_per_step"]) - 1)  # type: ignore[arg-type]
    json.dump(out, sys.stdout)
    print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
