"""KV-block migration vs recompute, engine to engine (what `POST /v1/cluster/migrate` does between replicas,
without Ray's transport): a request with a context of L tokens is stopped on engine A and resumed on engine B.

- blocks: A exports its full KV blocks (`Engine.export_kv`), they are pickled and unpickled (the bytes a Ray
  object carries), B imports them (`Engine.import_kv`) and computes the resume's first token, recomputing
  only the last partial block.
- recompute: B computes the resume's first token from the tokens alone (one prefill of L tokens).

Pause = everything from A's export to B's first new token; bytes/token = pickled export / exported tokens.
Medians over --repeats. Writes benchmarks/results/kv-migration.json.

    PYTHONPATH=. .venv/bin/python benchmarks/bench_kv_migration.py --models tiny smollm2-135m --contexts 128 512 1024
"""

from __future__ import annotations

import argparse
import json
import pickle
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from mixserve.builder import load_model, wire_engine  # noqa: E402
from mixserve.config import EngineConfig  # noqa: E402
from mixserve.engine.engine import Engine, ResumePoint  # noqa: E402
from mixserve.sampling_params import SamplingParams  # noqa: E402

GREEDY = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)


def engine_for(model: str, max_len: int, _loaded: dict[str, Any] = {}) -> Engine:  # noqa: B006 - a cache
    config = EngineConfig().with_options(model=model, block_size=16, max_model_len=max_len + 16,
                                         num_blocks=(max_len + 16) // 16 * 2 + 8)
    if model not in _loaded:
        _loaded.clear()
        _loaded[model] = load_model(config)
    return wire_engine(_loaded[model], config).engine


def first_token_s(engine: Engine, prompt: list[int], head: list[int]) -> float:
    """Resume after `head` and step until the first new token; the seconds it took."""
    start = time.perf_counter()
    engine.add_request("r", prompt, GREEDY, resume=ResumePoint(tuple(head), 0))
    while not any(o.token_ids for out in engine.step() for o in out.outputs):
        pass
    took = time.perf_counter() - start
    engine.abort_request("r")
    return took


def measure(model: str, context: int, repeats: int, vocab: int) -> dict[str, Any]:
    rng = random.Random(0)
    prompt = [rng.randrange(3, vocab) for _ in range(context - 2)]
    source = engine_for(model, context)
    source.add_request("r", prompt, SamplingParams(temperature=0.0, max_tokens=64, ignore_eos=True))
    head: list[int] = []
    while len(head) < 2:
        for out in source.step():
            head.extend(out.outputs[0].token_ids)
    blocks, recompute, nbytes, ntokens, recomputed = [], [], 0, 0, 0
    for _ in range(repeats):
        target, plain = engine_for(model, context), engine_for(model, context)
        first_token_s(plain, prompt, head[:1])  # warm both (first-call allocations)
        first_token_s(target, prompt, head[:1])
        target.scheduler.kv.pool.reset_prefix_cache()
        plain.scheduler.kv.pool.reset_prefix_cache()
        start = time.perf_counter()
        export = source.export_kv("r")
        assert export is not None
        data = pickle.dumps(export, protocol=5)
        target.import_kv(pickle.loads(data))
        before = target.counters["recomputed_tokens"]
        first_token_s(target, prompt, head)
        blocks.append(time.perf_counter() - start)
        recomputed = target.counters["recomputed_tokens"] - before
        nbytes, ntokens = len(data), len(export.token_ids)
        recompute.append(first_token_s(plain, prompt, head))
    return {"model": model, "context": len(prompt) + len(head), "exported_tokens": ntokens, "bytes": nbytes,
            "bytes_per_token": nbytes / ntokens, "recomputed_with_blocks": recomputed,
            "pause_blocks_s": statistics.median(blocks), "pause_recompute_s": statistics.median(recompute)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["tiny", "smollm2-135m"])
    ap.add_argument("--contexts", nargs="+", type=int, default=[128, 512, 1024])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    for name in args.models:
        model, vocab = name, 10_000
        if name == "tiny":
            from tests.cluster.tiny import VOCAB_SIZE, write_tiny_llama

            model, vocab = str(write_tiny_llama(Path(tempfile.mkdtemp()))), VOCAB_SIZE
        for context in args.contexts:
            row = measure(model, min(context, 480) if name == "tiny" else context, args.repeats, vocab)
            row["model"] = name
            print(json.dumps(row), flush=True)
            rows.append(row)
    out = ROOT / "benchmarks" / "results" / "kv-migration.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
