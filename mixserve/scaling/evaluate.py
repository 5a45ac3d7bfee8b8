"""`mixserve eval`: strategies x budgets on a generated task, batched across problems in one engine.

For each (strategy, budget) every problem's strategy runs concurrently (one `run_strategies` call),
then the selected answers are checked with the task's exact verifier. Every cell starts with an empty
prefix cache, so each pays its own prompt prefill and costs do not depend on the order of the cells.
"sample" rows also give the coverage curve: the unbiased pass@k over the N samples of each problem,
for every k <= N in budgets.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from tqdm import tqdm

from mixserve.sampling_params import SamplingParams
from mixserve.scaling.accounting import ModelCost
from mixserve.scaling.base import ScaleConfig, ScalingError
from mixserve.scaling.driver import run_strategies
from mixserve.scaling.metrics import mean_pass_at_k
from mixserve.scaling.registry import (
    BATCH_STRATEGIES,
    NEEDS_VERIFIER,
    STRATEGIES,
    VERIFIERS,
    make_strategies,
    make_strategy,
    make_verifier,
)
from mixserve.scaling.tasks import Problem, Task, get_task


@dataclass(frozen=True)
class EvalConfig:
    """One evaluation run (validated on construction)."""

    task: str = "arithmetic"
    """Generated task with an exact verifier (see `mixserve.scaling.TASKS`)."""
    strategies: tuple[str, ...] = ("sample", "majority", "bon", "bom")
    """Strategies to compare (see `mixserve.scaling.STRATEGIES`)."""
    budgets: tuple[int, ...] = (1, 2, 4, 8)
    """Samples (or beams/particles) per problem, one run per budget."""
    num_problems: int = 8
    """Problems generated for the run."""
    difficulty: tuple[int, ...] = (1,)
    """Task difficulties, 1 (easiest) to 5; several (`--difficulty 1,3,5`) mix them, problem i taking
    difficulty i mod len (a batch of mixed difficulty is where compute-optimal allocation pays)."""
    seed: int = 0
    """Seed of problem generation and sampling."""
    verifier: str = "auto"
    """auto: judge for outcome strategies, oracle_prm for search when the task has one (else judge)."""
    max_tokens: int = 96
    """Tokens per sample."""
    temperature: float = 0.7
    """Sampling temperature."""
    max_steps: int = 6
    """Step-level search depth (beam, pf)."""
    out_dir: str = "benchmarks/results/scaling"
    """Folder for the JSON and PNG plots (relative paths are under the current directory; the absolute
    path is printed)."""

    def __post_init__(self) -> None:
        if isinstance(self.difficulty, int):
            object.__setattr__(self, "difficulty", (self.difficulty,))
        if not self.difficulty:
            raise ScalingError("invalid difficulty=(): give at least one difficulty", field="difficulty")
        get_task(self.task)
        for name in self.strategies:
            if name not in STRATEGIES:
                raise ScalingError(f"invalid strategies={name!r}: known strategies are {', '.join(STRATEGIES)}",
                                   field="strategies")
        for b in self.budgets:
            if not isinstance(b, int) or b < 1:
                raise ScalingError(f"invalid budgets={b!r}: every budget must be an integer >= 1", field="budgets")
        if self.verifier != "auto" and self.verifier not in VERIFIERS:
            raise ScalingError(f"invalid verifier={self.verifier!r}: auto or one of {', '.join(VERIFIERS)}",
                               field="verifier")
        for d in self.difficulty:
            get_task(self.task).generate(1, self.seed, d)  # validates each difficulty
        if self.num_problems < 1:
            raise ScalingError(f"invalid num_problems={self.num_problems!r}: must be >= 1", field="num_problems")


def generate_problems(config: EvalConfig) -> list[Problem]:
    """`num_problems` problems; with several difficulties, problem i has difficulty i mod len (each
    difficulty's problems come from its own generator run, so one difficulty's set does not depend on
    how many others are mixed in beyond its count)."""
    task = get_task(config.task)
    diffs = config.difficulty
    counts = [len(range(i, config.num_problems, len(diffs))) for i in range(len(diffs))]
    per = [iter(task.generate(c, config.seed, d)) if c else iter(()) for c, d in zip(counts, diffs, strict=True)]
    return [next(per[i % len(diffs)]) for i in range(config.num_problems)]


def verifier_for(config: EvalConfig, strategy: str, task: Task, problem: Problem) -> str | None:
    if strategy not in NEEDS_VERIFIER:
        return None
    if config.verifier != "auto":
        return config.verifier
    if strategy in ("beam", "pf") and task.process_score(problem, "") is not None:
        return "oracle_prm"
    return "judge"


def prompt_ids(tokenizer: Any, problem: Problem) -> list[int]:
    if tokenizer.chat_template_is_default:
        return list(tokenizer.encode(problem.question + "\n"))
    return list(tokenizer.encode_chat([{"role": "user", "content": problem.question}]))


def reset_prefix_cache(engine: Any) -> None:
    """Forget the prefix cache of the engine's free blocks (every block is free between cells)."""
    engine.scheduler.pool.reset_prefix_cache()


def run_cell(engine: Any, tokenizer: Any, config: EvalConfig, strategy: str, budget: int,
             cost: ModelCost | None) -> dict[str, Any]:
    task = get_task(config.task)
    problems = generate_problems(config)
    params = SamplingParams(temperature=config.temperature, max_tokens=config.max_tokens, seed=config.seed)
    scale = ScaleConfig(budget=budget, params=params, max_steps=config.max_steps)
    tag = f"eval-{strategy}-{budget}"
    if strategy in BATCH_STRATEGIES:
        made = make_strategies(strategy, [prompt_ids(tokenizer, p) for p in problems], config=scale,
                               extract=task.extract, cost=cost, strategy_id=tag)
    else:
        made = []
        for i, p in enumerate(problems):
            spec = verifier_for(config, strategy, task, p)
            v = make_verifier(spec, tokenizer=tokenizer, task=task, problem=p, seed=config.seed)
            made.append(make_strategy(strategy, prompt_ids(tokenizer, p), verifier=v, config=scale,
                                      extract=task.extract, cost=cost, strategy_id=f"{tag}-{i}"))
    reset_prefix_cache(engine)  # this cell pays its own prompt prefill, whatever ran before it
    start = time.perf_counter()
    results: list[Any] = []
    for r in run_strategies(engine, made):
        results.extend(r if isinstance(r, list) else [r])
    seconds = time.perf_counter() - start
    correct = [task.check(p, r.answer) for p, r in zip(problems, results, strict=True)]
    counts = [(len(r.candidates), sum(task.check(p, c.answer) for c in r.candidates))
              for p, r in zip(problems, results, strict=True)]
    usage = [r.usage for r in results]
    row: dict[str, Any] = {
        "strategy": strategy, "budget": budget, "accuracy": sum(correct) / len(correct),
        "coverage": sum(c > 0 for _, c in counts) / len(counts), "seconds": seconds,
        "verifier": verifier_for(config, strategy, task, problems[0]) or "none",
        "samples": sum(u.num_samples for u in usage) / len(usage),
        "generated_tokens": sum(u.total_generated_tokens for u in usage) / len(usage),
        "prefill_tokens": sum(u.policy_prefill_tokens + u.verifier_prefill_tokens for u in usage) / len(usage),
        "reused_tokens": sum(u.policy_reused_tokens + u.verifier_reused_tokens for u in usage) / len(usage),
        "verifier_tokens": sum(u.verifier_prefill_tokens + u.verifier_generated_tokens for u in usage) / len(usage),
        "flops": sum(u.flops or 0.0 for u in usage) / len(usage)}
    if strategy == "sample":
        row["pass_at_k"] = {k: mean_pass_at_k(counts, k) for k in config.budgets if k <= budget}
    return row


def evaluate(engine: Any, tokenizer: Any, config: EvalConfig, cost: ModelCost | None = None,
             progress: bool = True) -> list[dict[str, Any]]:
    cells = [(s, b) for s in config.strategies for b in config.budgets]
    rows = []
    with tqdm(total=len(cells), desc=f"eval {config.task}", disable=not progress) as bar:
        for strategy, budget in cells:
            rows.append(run_cell(engine, tokenizer, config, strategy, budget, cost))
            bar.set_postfix(strategy=strategy, budget=budget, acc=f"{rows[-1]['accuracy']:.2f}")
            bar.update(1)
    return rows


def run_eval(llm: Any, config: EvalConfig, model_name: str) -> int:
    """Evaluate with a loaded `LLM`, print the table, write JSON + plots. Returns an exit code."""
    from mixserve.scaling.report import format_table, write_outputs

    rows = evaluate(llm.engine, llm.tokenizer, config, llm.cost())
    print(format_table(rows))
    out_dir = Path(config.out_dir).resolve()
    paths = write_outputs(rows, replace(config), model_name, out_dir)
    print(f"[mixserve] results in {out_dir} (--out DIR to choose)")
    for path in paths:
        print(f"[mixserve] wrote {path}")
    return 0


def config_dict(config: EvalConfig) -> dict[str, Any]:
    return asdict(config)
