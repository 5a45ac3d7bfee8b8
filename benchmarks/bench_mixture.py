"""Mixture of whole expert models on a mixed-skill set: each single model, random-k, majority across
models, Symbolic-MoE recruitment + aggregator, Mixture-of-Agents; and model loads / wall time of grouped
vs per-question scheduling under a pool budget that holds one model at a time.

    PYTHONPATH=. .venv/bin/python benchmarks/bench_mixture.py --per-task 3 --max-tokens 48
    PYTHONPATH=. .venv/bin/python benchmarks/bench_mixture.py --models smollm2-135m --specialists \
        --per-task 5 --max-tokens 32 --skip-scheduling       # with benchmarks/build_specialists.py's folders

`--models` takes known names, paths or `name=path`; `--specialists` adds the cached specialist folders
(`~/.cache/mixserve/specialists/smollm2-135m-<task>`, named `spec-<task>`) for every `--tasks` family.

Writes benchmarks/results/mixture_<stamp>.json (+ .png) and prints the tables. Every stage is saved as it
finishes, so a long run that is stopped keeps what it measured.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from mixserve.mixture.build import llm_expert_factory, parse_budget, real_pool
from mixserve.mixture.grading import TaskGrader, mixed_problems, questions_from
from mixserve.mixture.models import ModelSpec, spec_from_arg
from mixserve.mixture.pipeline import AGGREGATIONS, Mixture, MixtureConfig
from mixserve.mixture.profile import profile_models
from mixserve.mixture.profiles import Profiles
from mixserve.mixture.recruit import RecruitConfig
from mixserve.mixture.schedule import Job, run_grouped, run_per_question
from mixserve.mixture.skills import KEYWORD_PROMPTS, KeywordMapper, MiniLMEmbedder, SkillConfig
from mixserve.sampling_params import SamplingParams

RESULTS = Path(__file__).parent / "results"
SPECIALISTS = Path.home() / ".cache" / "mixserve" / "specialists"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="smollm2-135m,gemma3-270m", help="comma list: name, path or name=path")
    ap.add_argument("--specialists", action="store_true",
                    help="add the specialist folders of build_specialists.py (one per --tasks family)")
    ap.add_argument("--specialist-dir", default=str(SPECIALISTS))
    ap.add_argument("--annotator", default=None, help="keyword model (default: the first of --models)")
    ap.add_argument("--k", type=int, default=3, help="experts recruited per question (symbolic, random-k)")
    ap.add_argument("--moa-layers", type=int, default=2)
    ap.add_argument("--skip-scheduling", action="store_true", help="skip the grouped vs per-question comparison")
    ap.add_argument("--tasks", default="arithmetic,sorting,gcd")
    ap.add_argument("--per-task", type=int, default=3, help="test questions per task (validation: the same)")
    ap.add_argument("--val-per-task", type=int, default=None,
                    help="validation questions per task (default: --per-task)")
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--temperature", type=float, default=0.7,
                    help="experts' and aggregator's sampling temperature (the released code's 0.7; 0: greedy)")
    ap.add_argument("--keyword-samples", type=int, default=3)
    ap.add_argument("--keyword-temperature", type=float, default=0.7, help="keyword samples (self-consistency)")
    ap.add_argument("--keyword-prompt", default="shots", choices=KEYWORD_PROMPTS,
                    help="shots (default), paper (the released code's prompt), generic-shots")
    ap.add_argument("--aggregation", default="aggregator", choices=AGGREGATIONS,
                    help="symbolic / random-k: aggregator (paper), skip-on-agreement (MOSAIC), majority; a method "
                         "may also name its own, e.g. symbolic/majority")
    ap.add_argument("--pool-memory-budget", default="4GiB")
    ap.add_argument("--switch-budget", default="1800MB", help="scheduling comparison budget (one model at a time)")
    ap.add_argument("--switch-max-tokens", type=int, default=4)
    ap.add_argument("--methods", default="single,random,majority,symbolic,moa")
    ap.add_argument("--reuse-profile", default=None, help="a previous results JSON: reuse its profile stage")
    args = ap.parse_args()
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out: dict[str, Any] = {"args": vars(args), "note": "measured while other work shared the machine"}
    path = RESULTS / f"mixture_{stamp}.json"
    RESULTS.mkdir(exist_ok=True)

    def save() -> None:
        path.write_text(json.dumps(out, indent=1))

    tasks = args.tasks.split(",")
    specs = [spec_from_arg(m) for m in args.models.split(",") if m]
    if args.specialists:
        specs += [ModelSpec(name=f"spec-{t}", model=str(Path(args.specialist_dir) / f"smollm2-135m-{t}"))
                  for t in tasks]
    annotator = args.annotator or specs[0].name
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature)
    expert_of = llm_expert_factory(params)
    grader = TaskGrader()
    skills = SkillConfig(num_samples=args.keyword_samples, temperature=args.keyword_temperature,
                         prompt=args.keyword_prompt)
    pool, _ = real_pool(specs, parse_budget(args.pool_memory_budget))
    val = questions_from(mixed_problems(tasks, args.val_per_task or args.per_task, seed=1000, difficulty=1))
    test = questions_from(mixed_problems(tasks, args.per_task, seed=0, difficulty=1))
    t0 = time.perf_counter()
    if args.reuse_profile:
        out["profile"] = json.loads(Path(args.reuse_profile).read_text())["profile"]
        tmp = path.with_suffix(".profiles.json")
        tmp.write_text(json.dumps(out["profile"]["profiles"]))
        profiles = Profiles.load(tmp)
        tmp.unlink()
    else:
        profiles, keywords, prof_report = profile_models(pool, expert_of, val, grader, skills, annotator)
        out["profile"] = {"seconds": time.perf_counter() - t0, "profiles": profiles.to_json(),
                          "keywords": keywords, "report": prof_report.as_dict()}
    save()
    mapper = KeywordMapper(profiles.vocabulary(), MiniLMEmbedder()) if profiles.vocabulary() else None
    config = MixtureConfig(recruit=RecruitConfig(k=args.k), moa_layers=args.moa_layers,
                           aggregation=args.aggregation)
    mixture = Mixture(pool, expert_of, profiles, grader, config, skills, mapper, annotator=annotator)
    rows = []
    methods = args.methods.split(",")
    reused: dict[str, Any] = {}  # the first symbolic run's keywords (and their stage), for its variants
    for spec in methods:
        method, _, aggregation = spec.partition("/")
        singles = [s.name for s in specs] if method == "single" else [None]
        for single in singles:
            m = replace(mixture.config, single=single) if single else mixture.config
            m = replace(m, aggregation=aggregation) if aggregation else m
            runner = Mixture(pool, expert_of, profiles, grader, m, skills, mapper, annotator=annotator)
            if method == "symbolic" and mapper is None:
                continue
            run = runner.run(test, method, keywords=reused.get("keywords"))
            if method == "symbolic" and "keywords" not in reused:
                reused.update(keywords=[r.keywords for r in run.results], stage=run.stages["keywords"])
            elif method == "symbolic":  # its keywords are the first symbolic run's: count their time too
                run.stages["keywords (reused)"] = reused["stage"]
                run.report.add(reused["stage"])
            name = f"single:{single}" if single else f"random-{args.k}" if method == "random" else method
            if method in ("symbolic", "random") and m.aggregation != "aggregator":
                name += f"/{m.aggregation}"
            rows.append({"method": name, "accuracy": run.accuracy, "wall_s": run.report.wall_seconds,
                         "loads": run.report.loads, "stages": {k: v.as_dict() for k, v in run.stages.items()},
                         "recruited": [r.recruited for r in run.results],
                         "keywords": [r.keywords for r in run.results],
                         "tasks": [r.question.task for r in run.results],
                         "aggregated": [r.aggregated for r in run.results],
                         "correct": [r.correct for r in run.results],
                         "answers": [r.answer for r in run.results],
                         "finals": [r.final for r in run.results]})
            out["methods"] = rows
            save()
            print(f"{name:<24} acc {run.accuracy:.3f}  wall {run.report.wall_seconds:7.1f}s  "
                  f"loads {run.report.loads}", flush=True)
            if method == "symbolic" and not args.skip_scheduling and "scheduling" not in out:
                out["scheduling"] = compare_scheduling(specs, run, args)
                save()
    pool.close()
    print_tables(out)
    plot(out, path.with_suffix(".png"))
    print(f"-> {path}")


def compare_scheduling(specs: list[ModelSpec], run: Any, args: argparse.Namespace) -> dict[str, Any]:
    """The symbolic run's expert jobs again, grouped vs in question order, in a pool that holds one model."""
    expert_of = llm_expert_factory(SamplingParams(max_tokens=args.switch_max_tokens, temperature=0.7))
    result = {}
    for name, schedule in (("grouped", run_grouped), ("per-question", run_per_question)):
        pool, _ = real_pool(specs, parse_budget(args.switch_budget))
        jobs = [Job((i, s), m, replace(r_req, seed=s)) for i, r in enumerate(run.results)
                for s, m in enumerate(r.recruited) for r_req in [_request(r)]]
        _, report = schedule(jobs, pool, expert_of)
        pool.close()
        result[name] = report.as_dict()
        print(f"scheduling {name:<13} loads {report.loads:3d} switches {report.switches:3d} "
              f"MiB {report.bytes_loaded / 2**20:7.0f} wall {report.wall_seconds:7.1f}s", flush=True)
    result["speedup"] = result["per-question"]["wall_seconds"] / max(result["grouped"]["wall_seconds"], 1e-9)
    return result


def _request(result: Any) -> Any:
    from mixserve.mixture.experts import ExpertRequest

    return ExpertRequest(result.question, result.question.text, "solve")


def print_tables(out: dict[str, Any]) -> None:
    print(f"\n{'method':<24} {'accuracy':>8} {'wall s':>8} {'loads':>6}")
    for r in out.get("methods", []):
        print(f"{r['method']:<24} {r['accuracy']:>8.3f} {r['wall_s']:>8.1f} {r['loads']:>6}")
    s = out.get("scheduling")
    if s:
        print(f"\n{'scheduling':<14} {'loads':>6} {'switches':>8} {'MiB loaded':>10} {'wall s':>8}")
        for k in ("grouped", "per-question"):
            print(f"{k:<14} {s[k]['loads']:>6} {s[k]['switches']:>8} {s[k]['bytes_loaded'] / 2**20:>10.0f} "
                  f"{s[k]['wall_seconds']:>8.1f}")
        print(f"grouped speedup: {s['speedup']:.2f}x")


def plot(out: dict[str, Any], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    rows = out.get("methods", [])
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    axes[0].bar([r["method"] for r in rows], [r["accuracy"] for r in rows])
    axes[0].set_ylabel("accuracy")
    axes[1].bar([r["method"] for r in rows], [r["wall_s"] for r in rows])
    axes[1].set_ylabel("wall s")
    for ax in axes:
        ax.tick_params(axis="x", rotation=45)
    fig.tight_layout()
    fig.savefig(path)


if __name__ == "__main__":
    main()
