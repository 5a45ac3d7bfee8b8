"""`mixserve` command line: argparse -> config -> LLM. No logic of its own beyond I/O."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence

from mixserve.config import SECTION_PREFIXES, SECTION_TYPES, ConfigError, EngineConfig
from mixserve.flags import Flag, add_flags, parse_size, values_from
from mixserve.mixture.cli import RepeatableModel, add_serve_args, serve_models
from mixserve.sampling_params import SamplingParams
from mixserve.structured.cli import add_structured_args, structured_from_args

# Flags that differ from the plain derivation (mixserve/flags.py): short and historical names, sizes.
_ENGINE_FLAGS = {
    "model": Flag(names=("-m",), metavar="NAME|PATH", action=RepeatableModel,
                  help="serve: repeat for a pool of several models (NAME=PATH)"),
    "num_threads": Flag(names=("--threads",)),
    "weight_format": Flag(names=("--quantization",), parse=lambda text: "dense" if text == "none" else text),
    "kv_cache_bytes": Flag(parse=parse_size, metavar="SIZE"),
    "expert_memory_budget": Flag(metavar="SIZE"),
}
# The command line generates more than an API call by default and samples at a chat-like temperature.
_SAMPLING_FLAGS = {
    "n": Flag(names=("-n",)),
    "temperature": Flag(names=("-t",), default=0.7, override_default=True),
    "max_tokens": Flag(default=256, override_default=True),
    "stop": Flag(repeat=True),
}
_SAMPLING_FIELDS = ("n", "max_tokens", "min_tokens", "temperature", "top_p", "top_k", "min_p",
                    "repetition_penalty", "presence_penalty", "frequency_penalty", "seed", "stop",
                    "stop_token_ids", "ignore_eos")


def _add_model_args(p: argparse.ArgumentParser) -> None:
    """Every engine option (`EngineConfig.flat_fields()`), plus where pulled models live."""
    g = p.add_argument_group("engine (every field of mixserve.config; `LLM(**options)` takes the same names)")
    flat = EngineConfig.flat_fields()
    for section, prefix in SECTION_PREFIXES.items():
        add_flags(g, SECTION_TYPES[section], prefix=prefix,
                  flags={flat[k][1]: v for k, v in _ENGINE_FLAGS.items() if flat[k][0] == section})
    g.add_argument("--kv-cache-gib", dest="kv_cache_bytes", type=lambda x: int(float(x) * (1 << 30)),
                   default=argparse.SUPPRESS, help="KV cache memory in GiB (same as --kv-cache-bytes NGiB)")
    g.add_argument("--no-prefix-caching", dest="enable_prefix_caching", action="store_false",
                   default=argparse.SUPPRESS, help="same as --no-enable-prefix-caching")
    g.add_argument("--cache-dir", default=None, help="where pulled models live")


def _add_sampling_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("sampling (fields of SamplingParams)")
    add_flags(g, SamplingParams, only=_SAMPLING_FIELDS, flags=_SAMPLING_FLAGS)


def engine_config(args: argparse.Namespace) -> EngineConfig:
    return EngineConfig().with_options(**{name: getattr(args, name) for name in EngineConfig.flat_fields()
                                          if hasattr(args, name)})


def sampling_params(args: argparse.Namespace) -> SamplingParams:
    structured = structured_from_args(args) if "json_schema" in args else None
    return SamplingParams(**values_from(args, SamplingParams), structured=structured)


def _load(args: argparse.Namespace):  # -> LLM
    from mixserve.llm import LLM

    start = time.perf_counter()
    llm = LLM(config=engine_config(args), cache_dir=args.cache_dir)
    print(f"[mixserve] loaded {args.model} in {time.perf_counter() - start:.1f}s", file=sys.stderr)
    return llm


def cmd_generate(args: argparse.Namespace) -> int:
    params = sampling_params(args)  # validate before loading the model
    llm = _load(args)
    prompt = llm.chat_prompt([{"role": "user", "content": args.prompt}]) if args.chat else args.prompt
    start, first, num_tokens = time.perf_counter(), None, 0
    if params.n == 1:
        for delta in llm.stream(prompt, params):
            for out in delta.outputs:
                first = first or time.perf_counter()
                num_tokens += len(out.token_ids)
                sys.stdout.write(out.text)
                sys.stdout.flush()
        sys.stdout.write("\n")
    else:
        for result in llm.generate(prompt, params):
            first = first or time.perf_counter()
            for out in result.outputs:
                num_tokens += len(out.token_ids)
                print(f"--- sample {out.index} ({out.finish_reason.value if out.finish_reason else ''}) ---")
                print(out.text)
    elapsed = time.perf_counter() - start
    ttft = (first - start) if first else float("nan")
    print(f"[mixserve] {num_tokens} tokens in {elapsed:.2f}s ({num_tokens / elapsed:.1f} tok/s, "
          f"first token {ttft * 1000:.0f} ms)", file=sys.stderr)
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    params = sampling_params(args)
    llm = _load(args)
    messages: list[dict[str, str]] = []
    if args.system:
        messages.append({"role": "system", "content": args.system})
    print("[mixserve] chat: type a message, /reset to clear, /exit or Ctrl-D to quit", file=sys.stderr)
    while True:
        try:
            line = input("you> ").strip()
        except EOFError:
            print()
            return 0
        if line in ("/exit", "/quit"):
            return 0
        if line == "/reset":
            messages = messages[:1] if args.system else []
            continue
        if not line:
            continue
        messages.append({"role": "user", "content": line})
        sys.stdout.write("assistant> ")
        reply = ""
        for delta in llm.stream(llm.chat_prompt(messages), params):
            for out in delta.outputs:
                if out.index == 0:
                    reply += out.text
                    sys.stdout.write(out.text)
                    sys.stdout.flush()
        sys.stdout.write("\n")
        messages.append({"role": "assistant", "content": reply})


def _add_limit_args(p: argparse.ArgumentParser) -> None:
    from dataclasses import fields

    from mixserve.server.limits import LIMIT_HELP, RequestLimits, flag_name

    g = p.add_argument_group("request limits")
    for f in fields(RequestLimits):
        default = getattr(RequestLimits(), f.name)
        g.add_argument(flag_name(f.name), dest=f.name, type=type(default), default=default,
                       help=f"{LIMIT_HELP[f.name]} (default: %(default)s)")


def cmd_serve(args: argparse.Namespace) -> int:
    from mixserve.server.launch import ServeOptions, serve

    config = engine_config(args)
    from mixserve.server.limits import LIMIT_HELP, RequestLimits

    limits = RequestLimits(**{name: getattr(args, name) for name in LIMIT_HELP})
    options = ServeOptions(host=args.host, port=args.port, served_model_name=args.served_model_name,
                           shutdown_timeout_s=args.shutdown_timeout, reject_unknown_fields=args.reject_unknown_fields,
                           cache_dir=args.cache_dir, log_level=args.log_level, limits=limits,
                           cloud_split_layer=args.cloud_split_layer)
    pooled_args = args.models_file or len(getattr(args, "all_models", None) or []) > 1 or args.mixture
    if args.cloud_split_layer is not None and (args.ray or pooled_args):
        raise ConfigError(f"invalid --cloud-split-layer {args.cloud_split_layer}: edge sessions are served by the "
                          f"single-model server only (not with --ray or a model pool)", field="cloud_split_layer")
    if args.ray:
        from mixserve.cluster.cli import serve_ray

        return serve_ray(args, config, options)
    pooled = serve_models(args, options)
    return serve(config, options) if pooled is None else pooled


def cmd_models(args: argparse.Namespace) -> int:
    from mixserve.hub import list_models

    print(f"{'name':<16} {'size':>10}  {'cached':<7} source")
    for m in list_models(cache_dir=args.cache_dir):
        print(f"{m.name:<16} {m.size_bytes / 1e6:>8.1f}MB  {'yes' if m.cached else 'no':<7} {m.description}")
    return 0


def cmd_pull(args: argparse.Namespace) -> int:
    from mixserve.hub import pull

    path = pull(args.name, cache_dir=args.cache_dir)
    print(path)
    return 0


def cmd_pack(args: argparse.Namespace) -> int:
    import json

    from mixserve.experts.pack import dtype_plan, write_pack
    from mixserve.experts.store import ExpertStore
    from mixserve.hub import resolve_model

    overrides = json.loads(open(args.dtype_plan).read()) if args.dtype_plan else None
    out = write_pack(resolve_model(args.model, cache_dir=args.cache_dir), args.out,
                     choose=dtype_plan(args.expert_dtype, overrides), overwrite=args.overwrite)
    store = ExpertStore(out)
    if args.verify:
        store.verify()
    print(f"[mixserve] packed {len(store.entries)} experts of {len(store.layer_ids)} layers, "
          f"{store.total_nbytes() / 2**20:.1f} MiB, into {out}", file=sys.stderr)
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from mixserve.scaling.evaluate import EvalConfig, run_eval

    config = EvalConfig(**values_from(args, EvalConfig, prefix="eval_"))  # validate before loading the model
    return run_eval(_load(args), config, args.model)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mixserve", description="Inference engine for experts at every scale.")
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="generate from a prompt, streaming text")
    gen.add_argument("prompt")
    gen.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    _add_model_args(gen)
    _add_sampling_args(gen)
    add_structured_args(gen)
    gen.set_defaults(func=cmd_generate)
    chat = sub.add_parser("chat", help="interactive chat")
    chat.add_argument("--system", default=None, help="system message")
    _add_model_args(chat)
    _add_sampling_args(chat)
    chat.set_defaults(func=cmd_chat)
    srv = sub.add_parser("serve", help="OpenAI-compatible HTTP server")
    srv.add_argument("--host", default="127.0.0.1")
    srv.add_argument("--port", type=int, default=8000)
    srv.add_argument("--served-model-name", default=None, help="name clients send as `model` (default: --model)")
    srv.add_argument("--shutdown-timeout", type=float, default=30.0,
                     help="seconds in-flight requests may run after SIGTERM (default: %(default)s)")
    srv.add_argument("--reject-unknown-fields", action="store_true",
                     help="answer 400 to unknown request fields instead of ignoring them")
    srv.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    srv.add_argument("--cloud-split-layer", type=int, default=None, metavar="K",
                     help="also serve edge sessions of a split model (layers [K, L)) on ws://HOST:PORT/v1/edge/ws")
    _add_limit_args(srv)
    _add_model_args(srv)
    srv.set_defaults(max_num_waiting=256)  # a server answers 429 rather than queue without bound
    add_serve_args(srv)
    from mixserve.cluster.cli import add_serve_args as add_cluster_args

    add_cluster_args(srv)
    srv.set_defaults(func=cmd_serve)
    models = sub.add_parser("models", help="list known models")
    models.add_argument("--cache-dir", default=None)
    models.set_defaults(func=cmd_models)
    pull = sub.add_parser("pull", help="fetch a known model into the cache")
    pull.add_argument("name")
    pull.add_argument("--cache-dir", default=None)
    pull.set_defaults(func=cmd_pull)
    pack = sub.add_parser("pack", help="write an MoE checkpoint as an expert pack (one blob per expert)")
    pack.add_argument("model", help="MoE checkpoint: HF folder, GGUF file or known model name")
    pack.add_argument("out", help="output folder")
    pack.add_argument("--expert-dtype", default="auto",
                      choices=["auto", "float32", "bfloat16", "float16", "int8", "int4"],
                      help="encoding of every expert (auto: as stored; default: %(default)s)")
    pack.add_argument("--dtype-plan", default=None, metavar="JSON",
                      help='per-layer / per-expert encodings, e.g. {"0": "int8", "3.17": "bfloat16"}')
    pack.add_argument("--overwrite", action="store_true", help="replace an existing pack in OUT")
    pack.add_argument("--verify", action="store_true", help="re-read every expert and check its checksum")
    pack.add_argument("--cache-dir", default=None)
    pack.set_defaults(func=cmd_pack)
    from mixserve.scaling.evaluate import EvalConfig

    ev = sub.add_parser("eval", help="inference-time scaling strategies x budgets on a generated task")
    _add_model_args(ev)
    # dest eval_*: the evaluation's seed and temperature are not the engine's
    add_flags(ev.add_argument_group("evaluation (fields of EvalConfig)"), EvalConfig, dest_prefix="eval_",
              flags={"out_dir": Flag(names=("--out",)), "temperature": Flag(names=("-t",))})
    ev.set_defaults(func=cmd_eval)
    from mixserve.edge.cli import add_parsers as add_edge_parsers

    add_edge_parsers(sub)
    from mixserve.experts.moefy_cli import add_parser as add_moefy_parser

    add_moefy_parser(sub)
    from mixserve.mixture.cli import add_parser as add_mixture_parser

    add_mixture_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except KeyboardInterrupt:
        return 130
    except (ValueError, FileNotFoundError, RuntimeError) as exc:
        # Config, sampling, checkpoint and request errors all carry a message naming the culprit.
        print(f"mixserve: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
