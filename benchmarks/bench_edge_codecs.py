"""What the hidden-state codec costs in quality: τ = 1 (every token from the cloud), in process.

    .venv/bin/python benchmarks/bench_edge_codecs.py        # smollm2-135m, split 15, 6 arithmetic prompts x 32

For fp32 / fp16 / int8 transfer: bytes per position, and how many greedy outputs equal the fp32 run
(fp32 is bitwise the unsplit model) plus the per-token agreement with it. Writes
benchmarks/results/edge_codecs_<stamp>.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from mixserve.edge.api import load  # noqa: E402
from mixserve.edge.cloud import CloudContextManager, CloudService  # noqa: E402
from mixserve.edge.codec import Codec  # noqa: E402
from mixserve.edge.config import CloudConfig, EdgeConfig  # noqa: E402
from mixserve.edge.edge import EdgeRunner  # noqa: E402
from mixserve.edge.frames import model_key  # noqa: E402
from mixserve.edge.link import LocalLink  # noqa: E402
from mixserve.models.base import as_causal_lm  # noqa: E402
from mixserve.scaling.tasks import get_task  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--split-layer", type=int, default=15)
    p.add_argument("--num-prompts", type=int, default=6)
    p.add_argument("--max-tokens", type=int, default=32)
    args = p.parse_args()
    torch.set_num_threads(1)
    loaded = load(args.model, num_threads=1)
    model, cfg, tok = as_causal_lm(loaded.model), loaded.checkpoint.hf_config, loaded.checkpoint.tokenizer
    problems = get_task("arithmetic").generate(args.num_prompts, seed=0, difficulty=1)
    prompts = [tok.encode_chat([{"role": "user", "content": q.question}]) for q in problems]
    outs: dict[str, list[list[int]]] = {}
    for codec in Codec:
        service = CloudService(CloudContextManager(model, CloudConfig(split_layer=args.split_layer)),
                               model_key(cfg, args.split_layer), int(cfg["hidden_size"]))
        link = LocalLink(service)
        edge = EdgeRunner(model, cfg, EdgeConfig(split_layer=args.split_layer, exit_threshold=1.0, codec=codec,
                                                 max_len=1024), lambda link=link: link, torch.float32,
                          tuple(tok.eos_token_ids))
        outs[codec.name.lower()] = [edge.generate(ids, args.max_tokens).token_ids for ids in prompts]
    ref = outs["fp32"]
    rows = []
    for name, got in outs.items():
        same = sum(a == b for a, b in zip(got, ref))
        agree = sum(x == y for a, b in zip(got, ref) for x, y in zip(a, b)) / sum(map(len, ref))
        rows.append({"codec": name, "bytes_per_position": Codec[name.upper()].bytes_per_token(int(cfg["hidden_size"])),
                     "outputs_equal_fp32": same, "num_prompts": len(prompts), "token_agreement_with_fp32": agree})
        print(f"{name:>5} {rows[-1]['bytes_per_position']:6d} B/position  {same}/{len(prompts)} outputs == fp32  "
              f"token agreement {agree:.3f}", flush=True)
    out = ROOT / "benchmarks" / "results" / f"edge_codecs_{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps({"model": args.model, "split_layer": args.split_layer, "rows": rows}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
