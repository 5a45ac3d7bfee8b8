"""`mixserve mixture profile|run`: profile a pool of models on a validation set, then answer a mixed-skill
set by recruitment + aggregation (or a baseline), grouped by model under a pool memory budget."""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

from mixserve.config import ConfigError

DEFAULT_TASKS = "arithmetic,sorting,gcd"


def add_parser(subparsers: Any) -> None:
    mix = subparsers.add_parser("mixture", help="mixtures of whole expert models (Symbolic-MoE)")
    sub = mix.add_subparsers(dest="mixture_command", required=True)
    prof = sub.add_parser("profile", help="build skill profiles + pick the aggregator on a validation set")
    _common(prof)
    prof.add_argument("--num-questions", type=int, default=10, help="validation questions per task")
    prof.add_argument("--seed", type=int, default=1000, help="validation set seed (keep it apart from run's)")
    prof.add_argument("--out", required=True, help="profiles JSON to write")
    prof.set_defaults(func=cmd_profile)
    run = sub.add_parser("run", help="answer a mixed-skill set with a mixture method, grouped by model")
    _common(run)
    run.add_argument("--profiles", required=True, help="profiles JSON from `mixserve mixture profile`")
    run.add_argument("--num-questions", type=int, default=10, help="questions per task")
    run.add_argument("--seed", type=int, default=0)
    run.add_argument("--method", action="append", default=None,
                     help="symbolic (default), single, random, majority or moa (repeatable)")
    run.add_argument("-k", type=int, default=3, help="experts per question")
    run.add_argument("--no-replacement", action="store_true", help="draw experts without replacement")
    run.add_argument("--max-latency", type=float, default=None, help="only models at most this s/question")
    run.add_argument("--max-memory", default=None, help="only models at most this resident size (e.g. 600MB)")
    run.add_argument("--aggregator", default=None, help="aggregator model (default: the profiles' choice)")
    run.add_argument("--moa-layers", type=int, default=2)
    run.add_argument("--aggregation", choices=["aggregator", "skip-on-agreement", "majority"], default="aggregator",
                     help="symbolic/random: aggregator always (paper), not when the k answers agree (MOSAIC), "
                          "or their majority vote")
    run.add_argument("--scheduling", choices=["grouped", "per-question"], default="grouped")
    run.add_argument("--out", default=None, help="write every answer and the batch report as JSON")
    from mixserve.cluster.mixcli import add_run_args

    add_run_args(run)
    run.set_defaults(func=cmd_run)


class RepeatableModel(argparse.Action):
    """`--model A --model B`: `model` keeps the last (single-model commands), `all_models` gets every one."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        setattr(namespace, self.dest, values)
        seen = list(getattr(namespace, "all_models", None) or [])
        namespace.all_models = [*seen, values]


def add_serve_args(p: argparse.ArgumentParser) -> None:
    """Multi-model flags of `mixserve serve` (several --model, or --models-file)."""
    g = p.add_argument_group("multi-model (a pool of models, routed by the request's model field)")
    g.add_argument("--models-file", default=None, help='JSON {"models": [{"name", "model", ...}]}')
    g.add_argument("--pool-memory-budget", default="4GiB", help="resident bytes of all loaded models")
    g.add_argument("--preload", action="append", default=[], help="load this model at start (repeatable)")
    g.add_argument("--mixture", action="append", default=[], metavar="NAME=PROFILES",
                   help="serve a mixture of the pool's models as model mixture/NAME (profiles JSON from "
                        "`mixserve mixture profile`; repeatable)")
    g.add_argument("--mixture-max-tokens", type=int, default=128, help="max tokens of each expert call of a mixture")
    g.add_argument("--mixture-temperature", type=float, default=0.7,
                   help="sampling temperature of a mixture's experts and aggregator (paper: 0.7; 0: greedy)")
    g.add_argument("--mixture-aggregation", default="aggregator",
                   choices=["aggregator", "skip-on-agreement", "majority"],
                   help="aggregator: always (paper); skip-on-agreement: not when the experts agree (MOSAIC); "
                        "majority: vote, no aggregator")
    g.add_argument("--mixture-keyword-prompt", choices=["shots", "paper", "generic-shots"], default="shots",
                   help="keyword prompt of a mixture (see `mixserve mixture run --keyword-prompt`)")


def serve_models(args: argparse.Namespace, options: Any) -> int | None:
    """Serve a pool when several models (or a models file) are given; None: the single-model server."""
    models = getattr(args, "all_models", None) or []
    if not args.models_file and len(models) < 2 and not args.mixture:
        return None
    from mixserve.mixture.build import model_specs, parse_budget
    from mixserve.mixture.server import serve_pool

    specs = model_specs(models, args.models_file)
    unknown = [m for m in args.preload if m not in {s.name for s in specs}]
    if unknown:
        raise ConfigError(f"invalid --preload {unknown[0]!r}: not one of {[s.name for s in specs]}", field="preload")
    mixtures = {}
    for item in args.mixture:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise ConfigError(f"invalid --mixture {item!r}: expected NAME=PROFILES.json", field="mixture")
        mixtures[name] = path
    if args.mixture_max_tokens < 1:
        raise ConfigError(f"invalid --mixture-max-tokens {args.mixture_max_tokens!r}: must be >= 1",
                          field="mixture_max_tokens")
    if args.mixture_temperature < 0:
        raise ConfigError(f"invalid --mixture-temperature {args.mixture_temperature!r}: must be >= 0",
                          field="mixture_temperature")
    from mixserve.mixture.pipeline import MixtureConfig
    from mixserve.mixture.skills import SkillConfig

    return serve_pool(specs, parse_budget(args.pool_memory_budget), options, args.preload, mixtures,
                      args.mixture_max_tokens, args.mixture_temperature,
                      MixtureConfig(aggregation=args.mixture_aggregation),
                      SkillConfig(prompt=args.mixture_keyword_prompt))


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", "-m", action="append", default=None, metavar="NAME[=PATH]",
                   help="a pool model: known name, path, or name=path (repeatable)")
    p.add_argument("--models-file", default=None, help='JSON {"models": [{"name", "model", ...}]}')
    p.add_argument("--pool-memory-budget", default="4GiB", help="resident bytes of all loaded models")
    p.add_argument("--tasks", default=DEFAULT_TASKS, help="comma-separated scaling tasks (the skills)")
    p.add_argument("--difficulty", type=int, default=1)
    p.add_argument("--annotator", default=None, help="keyword model (default: the first model)")
    p.add_argument("--keyword-samples", type=int, default=5, help="k of the self-consistency filter")
    p.add_argument("--keyword-temperature", type=float, default=0.7,
                   help="temperature of the keyword samples (also when --temperature is 0)")
    p.add_argument("--keyword-prompt", choices=["shots", "paper", "generic-shots"], default="shots",
                   help="shots: examples as chat turns (default); paper: the released code's prompt; "
                        "generic-shots: examples from no task family")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--cache-dir", default=None)


def _setup(args: argparse.Namespace) -> tuple[Any, Any, Any, list[Any], Any]:
    import torch

    from mixserve.mixture.build import llm_expert_factory, model_specs, parse_budget, real_pool
    from mixserve.mixture.grading import TaskGrader, mixed_problems, questions_from
    from mixserve.mixture.skills import SkillConfig
    from mixserve.sampling_params import SamplingParams

    if args.threads:
        torch.set_num_threads(args.threads)
    specs = model_specs(args.model, args.models_file)
    pool, _ = real_pool(specs, parse_budget(args.pool_memory_budget), args.cache_dir)
    if args.annotator is not None and args.annotator not in pool.names:
        raise ConfigError(f"invalid --annotator {args.annotator!r}: not in the pool ({pool.names})",
                          field="annotator")
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature)
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    problems = mixed_problems(tasks, args.num_questions, seed=args.seed, difficulty=args.difficulty)
    return pool, llm_expert_factory(params), TaskGrader(), questions_from(problems), \
        SkillConfig(num_samples=args.keyword_samples, temperature=args.keyword_temperature,
                    prompt=args.keyword_prompt)


def cmd_profile(args: argparse.Namespace) -> int:
    from mixserve.mixture.profile import profile_models

    pool, expert_of, grader, questions, skills = _setup(args)
    start = time.perf_counter()
    profiles, keywords, report = profile_models(pool, expert_of, questions, grader, skills,
                                                args.annotator or pool.names[0], seed=args.seed)
    profiles.save(args.out)
    print(f"{'model':<16} {'val acc':>8} {'s/question':>10} {'MiB':>7} {'agg score':>9}")
    for m in profiles.models:
        c = profiles.costs[m]
        print(f"{m:<16} {profiles.accuracy.get(m, 0):>8.2f} {c.latency_s:>10.2f} {c.memory_bytes / 2**20:>7.0f} "
              f"{profiles.aggregator_scores.get(m, float('nan')):>9.2f}")
    print(f"[mixserve] aggregator: {profiles.aggregator}; {len(profiles.vocabulary())} keywords; "
          f"{report.loads} loads; {time.perf_counter() - start:.1f}s -> {args.out}", file=sys.stderr)
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from mixserve.mixture.build import parse_budget
    from mixserve.mixture.pipeline import Mixture, MixtureConfig
    from mixserve.mixture.profiles import Profiles
    from mixserve.mixture.recruit import RecruitConfig
    from mixserve.mixture.skills import KeywordMapper, MiniLMEmbedder

    profiles = Profiles.load(args.profiles)
    methods = args.method or ["symbolic"]
    recruit = RecruitConfig(k=args.k, with_replacement=not args.no_replacement, max_latency_s=args.max_latency,
                            max_memory_bytes=parse_budget(args.max_memory) if args.max_memory else None)
    config = MixtureConfig(recruit=recruit, seed=args.seed, aggregator=args.aggregator,
                           moa_layers=args.moa_layers, scheduling=args.scheduling, aggregation=args.aggregation)
    pool, expert_of, grader, questions, skills = _setup(args)
    mapper = KeywordMapper(profiles.vocabulary(), MiniLMEmbedder()) if "symbolic" in methods else None
    annotator = args.annotator or pool.names[0]
    cluster = None
    if getattr(args, "ray", False):
        from mixserve.cluster.mixcli import start_cluster_pool

        cluster = start_cluster_pool(args)
        pool, expert_of = cluster.pool, cluster.pool.expert_of
    try:
        return _run_methods(args, methods, questions, Mixture(
            pool, expert_of, profiles, grader, config, skills, mapper, annotator,
            executor=cluster.pool.run_grouped if cluster is not None else None), cluster)
    finally:
        if cluster is not None:
            cluster.close()


def _run_methods(args: argparse.Namespace, methods: list[str], questions: list[Any], mixture: Any,
                 cluster: Any) -> int:
    rows, dump = [], {}
    for method in methods:
        run = mixture.run(questions, method)
        r = run.report
        rows.append((method, run.accuracy, r.wall_seconds, r.loads, r.switches, r.bytes_loaded))
        dump[method] = {"accuracy": run.accuracy, "report": r.as_dict(),
                        "stages": {k: v.as_dict() for k, v in run.stages.items()},
                        "results": [{"qid": x.question.qid, "task": x.question.task, "keywords": x.keywords,
                                     "recruited": x.recruited, "answer": x.answer, "reference": x.question.reference,
                                     "correct": x.correct, "answers": x.answers, "final": x.final,
                                     "aggregated": x.aggregated}
                                    for x in run.results]}
        if cluster is not None:
            dump[method]["replicas"] = cluster.pool.replicas()  # cumulative, after this method
    print(f"{'method':<10} {'accuracy':>8} {'wall s':>8} {'loads':>6} {'switches':>8} {'MiB loaded':>10}")
    for method, acc, wall, loads, switches, nbytes in rows:
        print(f"{method:<10} {acc:>8.3f} {wall:>8.1f} {loads:>6} {switches:>8} {nbytes / 2**20:>10.0f}")
    if cluster is not None:
        from mixserve.cluster.mixcli import print_replicas

        print_replicas(cluster.pool.replicas())
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dump, f, indent=1)
    return 0
