"""Build strategies and verifiers by name (what `LLM.scale`, the eval CLI and the server call).

Strategy names: see `STRATEGIES`. Verifier names: see `VERIFIERS`; a Python callable
`f(text) -> float` is also accepted as a verifier (a user-supplied function), and so is a
`ProblemVerifier` (`score(problem, candidate)`, e.g. `ScoreAnswerVerifier` for reasoning-gym-style
`score_answer(answer, entry)`), bound to each problem's `ScaleProblem`. Extractors: `EXTRACTORS`.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

from mixserve.sampling_params import SamplingParams
from mixserve.scaling import select
from mixserve.scaling.accounting import ModelCost
from mixserve.scaling.adaptive import AdaptiveConsistency
from mixserve.scaling.answers import Extractor, get_extractor
from mixserve.scaling.base import ScaleConfig, ScalingError, Strategy
from mixserve.scaling.beam import BeamPolicy
from mixserve.scaling.compute_optimal import ComputeOptimal, SingleComputeOptimal
from mixserve.scaling.first_finish import FirstFinish
from mixserve.scaling.judge import JudgeVerifier
from mixserve.scaling.particle import ParticlePolicy
from mixserve.scaling.sampling import SampleAndSelect, Selector
from mixserve.scaling.search import StepSearch, make_rng
from mixserve.scaling.tasks import Problem, Task
from mixserve.scaling.tracker import Tracker
from mixserve.scaling.verifiers import (
    FunctionVerifier,
    NoisyVerifier,
    ProblemVerifier,
    ScaleProblem,
    Verifier,
    bind_problem,
    is_problem_verifier,
)

STRATEGIES = {
    "sample": "repeated sampling: all N candidates (for pass@k / coverage)",
    "majority": "self-consistency: most frequent extracted answer",
    "weighted": "majority weighted by verifier score",
    "bon": "best-of-N by verifier score",
    "bom": "Best-of-Majority: frequency-gated top-k by verifier score",
    "adaptive": "self-consistency that stops when the vote is settled (beta / supermajority)",
    "ffs": "first-finish search: first finished of N, abort the rest",
    "confidence": "highest token-level confidence (negative tail entropy), no verifier",
    "beam": "step-level beam search with a process reward",
    "pf": "particle filtering with a process reward",
    "compute_optimal": "batch majority under a total budget: probe, stop easy problems, spend the rest "
                       "where the vote can still change (budget = mean samples per problem)",
    "hogwild": "Hogwild! inference: budget workers share one KV cache and see each other's steps "
               "(max_tokens = tokens per worker; mixserve/hogwild/)",
}
BATCH_STRATEGIES = {"compute_optimal"}
"""Strategies that run a whole batch of problems as one controller (`make_strategies`)."""
NEEDS_VERIFIER = {"weighted", "bon", "bom", "beam", "pf"}
VERIFIERS = {
    "none": "no verifier",
    "judge": "LLM self-evaluation: P(yes) after a judge question, one forward pass",
    "task": "exact programmatic verifier of the task (binary)",
    "oracle_prm": "exact process reward from the task's solvability check (+ exact outcome)",
    "noisy_prm": "oracle_prm with each score flipped with probability `noise`",
}

VerifierSpec = Verifier | ProblemVerifier | str | Callable[[str], float] | None


def new_strategy_id() -> str:
    return "scale-" + uuid.uuid4().hex[:12]


def make_verifier(spec: VerifierSpec, *, tokenizer: Any = None, task: Task | None = None,
                  problem: Problem | None = None, noise: float = 0.2, seed: int = 0,
                  scale_problem: ScaleProblem | None = None, extract: Extractor | str | None = None
                  ) -> Verifier | None:
    """A verifier from a name (`VERIFIERS`), a callable, a ready `Verifier`, a `ProblemVerifier`
    (bound to `scale_problem`, scoring answers found by `extract`), or None."""
    if spec is None or spec == "none":
        return None
    if is_problem_verifier(spec):
        return bind_problem(spec, scale_problem or ScaleProblem(None), get_extractor(extract))  # type: ignore[arg-type]
    if callable(spec) and not isinstance(spec, str):
        return FunctionVerifier(spec, name=getattr(spec, "__name__", "function"))
    if not isinstance(spec, str):
        return spec  # type: ignore[return-value]
    if spec not in VERIFIERS:
        raise ScalingError(f"invalid verifier={spec!r}: known verifiers are {', '.join(VERIFIERS)}, "
                           f"or a Python function", field="verifier")
    if spec == "judge":
        if tokenizer is None:
            raise ScalingError("invalid verifier='judge': it needs the model's tokenizer", field="verifier")
        return JudgeVerifier.from_tokenizer(tokenizer)
    if task is None or problem is None:
        raise ScalingError(f"invalid verifier={spec!r}: it needs a task problem (use 'judge' or a function)",
                           field="verifier")
    t, p = task, problem

    def outcome(text: str) -> float:
        return float(t.check(p, t.extract(text)))

    if spec == "task":
        return FunctionVerifier(outcome, name="task")
    if t.process_score(p, "") is None:
        raise ScalingError(f"invalid verifier={spec!r}: task {t.name!r} has no exact process reward "
                           f"(use 'task')", field="verifier")

    def process(text: str) -> float:
        score = t.process_score(p, text)
        return 0.0 if score is None else score

    oracle = FunctionVerifier(outcome, process, name="oracle_prm")
    return oracle if spec == "oracle_prm" else NoisyVerifier(oracle, noise, seed)


def make_strategy(name: str, prompt_ids: Sequence[int], budget: int | None = None,
                  params: SamplingParams | None = None, verifier: VerifierSpec = None,
                  tokenizer: Any = None, *, config: ScaleConfig | None = None,
                  extract: Extractor | str | None = None, cost: ModelCost | None = None,
                  strategy_id: str | None = None, problem: ScaleProblem | None = None) -> Strategy:
    """A ready-to-start strategy; raises ScalingError naming a bad field (name, budget, verifier)."""
    if name not in STRATEGIES:
        raise ScalingError(f"invalid strategy={name!r}: known strategies are {', '.join(STRATEGIES)}", field="strategy")
    config = config or ScaleConfig()
    if budget is not None or params is not None:
        config = replace(config, budget=config.budget if budget is None else budget,
                         params=params or config.params)
    extractor = get_extractor(extract)
    v = make_verifier(verifier, tokenizer=tokenizer, scale_problem=problem, extract=extractor)
    if name in NEEDS_VERIFIER and v is None:
        raise ScalingError(f"invalid verifier=None: strategy {name!r} needs one ({', '.join(VERIFIERS)})",
                           field="verifier")
    if not prompt_ids:
        raise ScalingError("invalid prompt: it is empty", field="prompt")
    tracker = Tracker(strategy_id or new_strategy_id(), list(prompt_ids), extractor, v, cost)
    return _build(name, tracker, config)


def make_strategies(name: str, prompts: Sequence[Sequence[int]], budget: int | None = None,
                    params: SamplingParams | None = None, verifier: VerifierSpec = None, tokenizer: Any = None,
                    *, config: ScaleConfig | None = None, extract: Extractor | str | None = None,
                    cost: ModelCost | None = None, strategy_id: str | None = None,
                    problems: Sequence[ScaleProblem] | None = None) -> list[Strategy]:
    """Controllers for a batch of problems (token prompts), ids `{strategy_id}-p{i}` (just
    `strategy_id` for a batch of one): one per problem,
    or one for the whole batch for `BATCH_STRATEGIES` (its result is the list of per-problem results).
    `problems` (same length) are what problem-aware verifiers see."""
    if not prompts:
        raise ScalingError("invalid prompt: the batch of problems is empty", field="prompt")
    if problems is not None and len(problems) != len(prompts):
        raise ScalingError(f"invalid problems: {len(problems)} problems for {len(prompts)} prompts", field="prompt")
    base = strategy_id or new_strategy_id()
    if name not in BATCH_STRATEGIES:
        return [make_strategy(name, ids, budget, params, verifier, tokenizer, config=config, extract=extract,
                              cost=cost, strategy_id=base if len(prompts) == 1 else f"{base}-p{i}",
                              problem=problems[i] if problems is not None else None)
                for i, ids in enumerate(prompts)]
    config = config or ScaleConfig()
    if budget is not None or params is not None:
        config = replace(config, budget=config.budget if budget is None else budget, params=params or config.params)
    if verifier not in (None, "none"):
        raise ScalingError(f"invalid verifier={verifier!r}: strategy {name!r} votes without a verifier",
                           field="verifier")
    extractor = get_extractor(extract)
    trackers = []
    for i, ids in enumerate(prompts):
        if not ids:
            raise ScalingError(f"invalid prompt: problem {i} is empty", field="prompt")
        trackers.append(Tracker(f"{base}/p{i}", list(ids), extractor, None, cost))
    return [ComputeOptimal(base, trackers, config)]  # type: ignore[list-item]


def _build(name: str, t: Tracker, c: ScaleConfig) -> Strategy:
    rules: dict[str, Selector] = {
        "majority": select.majority, "weighted": select.weighted_majority,
        "bon": lambda cs: select.best_of_n(cs, c.k),
        "bom": lambda cs: select.best_of_majority(cs, c.k, c.bom_alpha),
        "confidence": select.most_confident, "sample": select.first_sample}
    if name in rules:
        logprobs = c.confidence_top_logprobs if name == "confidence" else None
        return SampleAndSelect(name, t, c, rules[name], logprobs=logprobs, return_all=name == "sample")
    if name in BATCH_STRATEGIES:
        single = Tracker(t.strategy_id + "/p0", t.prompt_ids, t.extract, None, t.cost)
        return SingleComputeOptimal(t.strategy_id, [single], c)
    if name == "adaptive":
        return AdaptiveConsistency(t, c)
    if name == "ffs":
        return FirstFinish(t, c)
    if name == "hogwild":
        from mixserve.hogwild.strategy import HogwildStrategy

        return HogwildStrategy(t, c)
    if name == "beam":
        width = c.beam_width or max(1, c.budget // 4)
        return StepSearch(name, t, c, BeamPolicy(c.budget, width))
    rng = make_rng(c.params.seed, t.strategy_id)
    return StepSearch(name, t, c, ParticlePolicy(c.budget, c.pf_temperature, c.ess_threshold, rng))
