"""`mixserve edge` and `mixserve cloud`: argparse -> EdgeLLM / CloudServer. No logic beyond I/O."""

from __future__ import annotations

import argparse
import json
import signal
import sys
import time
from dataclasses import asdict
from typing import Any


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", "-m", default="smollm2-135m", help="known model name or path (default: %(default)s)")
    p.add_argument("--split-layer", type=int, required=True, help="K: the edge runs layers [0, K), the cloud [K, L)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--weight-format", choices=["auto", "dense", "int8"], default="auto")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    p.add_argument("--cache-dir", default=None)


def add_parsers(sub: Any) -> None:
    """Register `edge` and `cloud` on the `mixserve` subcommand parser."""
    edge = sub.add_parser("edge", help="split inference, edge side: layers [0, K) + early exit, defers to a cloud")
    edge.add_argument("prompt", nargs="?", default=None,
                      help="prompt text, or `fit-exit` to fit an exit adapter for --split-layer; "
                           "omit with --serve")
    edge.add_argument("--serve", action="store_true", help="serve the OpenAI API on --host/--port instead")
    edge.add_argument("--served-model-name", default=None, help="the model name clients send (default: --model)")
    edge.add_argument("--host", default="127.0.0.1")
    edge.add_argument("--port", type=int, default=8100)
    edge.add_argument("--cloud", default=None, metavar="URL",
                      help="cloud endpoint, e.g. ws://127.0.0.1:8765 (omit: standalone edge)")
    edge.add_argument("--exit-threshold", type=float, default=0.8,
                      help="τ: emit the edge's token when its top probability >= τ; >= 1 always defers")
    edge.add_argument("--codec", choices=["fp32", "fp16", "int8"], default="fp16", help="hidden-state transfer")
    edge.add_argument("--cloud-timeout", type=float, default=5.0, help="seconds to wait for a deferred token")
    edge.add_argument("--retry-interval", type=float, default=2.0, help="seconds standalone before reconnecting")
    edge.add_argument("--naive", action="store_true", help="baseline: resend the whole context on each deferral")
    edge.add_argument("--max-tokens", type=int, default=64)
    edge.add_argument("--max-len", type=int, default=2048, help="most positions of one sequence")
    edge.add_argument("--ignore-eos", action="store_true")
    edge.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    edge.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default); the edge and the cloud "
                                                                   "draw with the same (seed, position) randomness")
    edge.add_argument("--top-p", type=float, default=1.0)
    edge.add_argument("--top-k", type=int, default=None)
    edge.add_argument("--min-p", type=float, default=0.0)
    edge.add_argument("--seed", type=int, default=None, help="sampling seed (default: a random one)")
    edge.add_argument("--json", action="store_true", help="print one JSON object (tokens, sources, usage)")
    edge.add_argument("--exit-adapter", default=None, metavar="PATH",
                      help="exit head fitted by `mixserve edge fit-exit` (default: the model's own norm + LM head)")
    fit = edge.add_argument_group("fit-exit (`mixserve edge fit-exit --model M --split-layer K`)")
    fit.add_argument("--fit-prompts-per-task", type=int, default=2,
                     help="task-suite prompts per task and difficulty (1-3) the whole model continues")
    fit.add_argument("--fit-tokens", type=int, default=64, help="tokens sampled after each prompt")
    fit.add_argument("--fit-ridge", type=float, default=1.0)
    fit.add_argument("--out", default=None, help="where to save (default: beside the model)")
    _model_args(edge)
    edge.set_defaults(func=cmd_edge)
    cloud = sub.add_parser("cloud", help="split inference, cloud side: layers [K, L) + head, WebSocket endpoint")
    cloud.add_argument("--host", default="127.0.0.1")
    cloud.add_argument("--port", type=int, default=8765, help="0: any free port (printed)")
    cloud.add_argument("--session-ttl", type=float, default=600.0, help="seconds an idle session is kept")
    cloud.add_argument("--memory-budget-gib", type=float, default=1.0, help="KV + hidden states of all sessions")
    _model_args(cloud)
    cloud.set_defaults(func=cmd_cloud)


def _load_kw(args: argparse.Namespace) -> dict[str, Any]:
    return dict(dtype=args.dtype, weight_format=args.weight_format, num_threads=args.threads,
                cache_dir=args.cache_dir)


def cmd_fit_exit(args: argparse.Namespace) -> int:
    from mixserve.edge.api import fit_exit
    from mixserve.edge.exit_adapter import FitConfig

    config = FitConfig(max_tokens=args.fit_tokens, ridge=args.fit_ridge)
    start = time.perf_counter()
    path, adapter = fit_exit(args.model, args.split_layer, args.fit_prompts_per_task, config, args.out,
                             lambda i, n: print(f"[mixserve edge] fit-exit: sequence {i}/{n}", file=sys.stderr,
                                                flush=True), **_load_kw(args))
    meta = adapter.meta
    print(f"[mixserve edge] exit adapter for layer {args.split_layer} written to {path} in "
          f"{time.perf_counter() - start:.0f}s: agreement with the full model on "
          f"{meta['num_test_positions']} held-out positions {meta['agreement_adapter']:.3f} "
          f"(default head {meta['agreement_default_head']:.3f})")
    return 0


def cmd_edge(args: argparse.Namespace) -> int:
    from mixserve.edge.api import EdgeLLM

    if args.prompt == "fit-exit":
        return cmd_fit_exit(args)
    if (args.prompt is None) != args.serve:
        raise ValueError("give a prompt, or --serve without one")
    llm = EdgeLLM(args.model, args.cloud, args.split_layer, args.exit_threshold, args.codec, args.cloud_timeout,
                  args.retry_interval, args.naive, args.max_len, args.exit_adapter, **_load_kw(args))
    if args.serve:
        import uvicorn

        from mixserve.edge.server import build_edge_app

        print(f"[mixserve edge] OpenAI API on http://{args.host}:{args.port}/v1 (cloud: {args.cloud})", flush=True)
        uvicorn.run(build_edge_app(llm, args.served_model_name or args.model), host=args.host, port=args.port,
                    log_level="warning")
        return 0
    detok = llm.tokenizer.detokenizer(llm.encode(args.prompt, args.chat))

    def show(token: int, source: str) -> None:
        if not args.json:
            sys.stdout.write(detok.push(token))
            sys.stdout.flush()

    start = time.perf_counter()
    from mixserve.sampling_params import SamplingParams

    params = SamplingParams(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, min_p=args.min_p,
                            seed=args.seed, max_tokens=args.max_tokens, ignore_eos=args.ignore_eos)
    out = llm.generate(args.prompt, args.max_tokens, args.ignore_eos, args.chat, on_token=show, params=params)
    elapsed = time.perf_counter() - start
    llm.close()
    usage = {**out.result.usage, "completion_tokens": len(out.result.token_ids), "seconds": round(elapsed, 4)}
    if args.json:
        print(json.dumps({"text": out.text, "prompt_token_ids": llm.encode(args.prompt, args.chat),
                          "token_ids": out.result.token_ids, "sources": out.result.sources,
                          "finish_reason": out.result.finish_reason, "usage": usage}))
    else:
        print()
        print(f"[mixserve edge] {json.dumps(usage)}", file=sys.stderr)
    return 0


def cmd_cloud(args: argparse.Namespace) -> int:
    from mixserve.edge.api import CloudServer

    server = CloudServer(args.model, args.split_layer, args.host, args.port, args.session_ttl,
                         int(args.memory_budget_gib * (1 << 30)), **_load_kw(args))

    def stop(*_: Any) -> None:
        raise KeyboardInterrupt  # leaves serve_forever in this (main) thread

    signal.signal(signal.SIGTERM, stop)
    print(f"[mixserve cloud] layers [{args.split_layer}, L) of {args.model} listening on {server.url}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        print(f"[mixserve cloud] {json.dumps(asdict(server.stats))}", file=sys.stderr, flush=True)
    return 0
