"""The `Strategy` seam: an event-driven controller over the public engine API.

A strategy never calls `engine.step()`. It is a `Controller` of the engine's `Dispatcher`
(engine/dispatcher.py): whoever owns the engine loop (the sync driver in `driver.py`, `LLM.scale`, the
eval harness or the server's engine thread) starts it through the dispatcher, which hands it every
delta of its requests between steps until `done`. Inside those calls a strategy may add, fork, abort
and release requests; every request id it creates starts with its `controller_id` + "/" (so routing
and `owns` are a prefix test and ids never collide).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal, Protocol

from mixserve.config import FieldError
from mixserve.engine.dispatcher import Controller
from mixserve.sampling_params import SamplingParams
from mixserve.scaling.accounting import ComputeUsage


class ScalingError(FieldError):
    """Bad strategy input; the message names the field and the value, `field` names the field."""


def require(ok: bool, name: str, value: object, why: str) -> None:
    if not ok:
        raise ScalingError(f"invalid {name}={value!r}: {why}", field=name)


@dataclass(frozen=True)
class Candidate:
    """One finished sample (or search path) a strategy considered."""

    index: int
    text: str
    """The generated text (all steps, for step-level search)."""
    answer: str | None
    """Canonical extracted answer (None when no answer could be extracted)."""
    num_tokens: int
    score: float | None = None
    """Verifier score in [0, 1] when the strategy used a verifier."""
    confidence: float | None = None
    """Higher is more confident (negative mean tail entropy of the token distributions)."""
    finish_reason: str | None = None


@dataclass(frozen=True)
class ScaleResult:
    """What a strategy returns: the selection, every candidate, and what it cost."""

    strategy: str
    answer: str | None
    """The selected canonical answer."""
    text: str
    """Text of the selected candidate ("" when there is none)."""
    selected: tuple[int, ...]
    """Indices into `candidates`, best first (k of them for pass@k strategies)."""
    candidates: tuple[Candidate, ...]
    usage: ComputeUsage
    info: Mapping[str, float | int | str] = field(default_factory=dict)
    """Strategy-specific facts: samples used, stopped early, steps, resamplings, ..."""


AdaptiveRule = Literal["beta", "supermajority"]


@dataclass(frozen=True)
class ScaleConfig:
    """Knobs of all strategies; each strategy reads the ones it documents. Validated here."""

    budget: int = 8
    """Samples (sampling strategies: the maximum for adaptive ones), particles (PF), or candidate steps
    per round (beam search)."""
    params: SamplingParams = field(default_factory=lambda: SamplingParams(temperature=0.7, max_tokens=256))
    """Policy sampling; `n` is ignored (the strategy decides), `seed` seeds every sample reproducibly."""
    k: int = 1
    """Answers to submit (Best-of-Majority for pass@k)."""
    bom_alpha: float = 0.1
    """Best-of-Majority frequency gate: only answers given by at least this fraction of samples compete."""
    adaptive_rule: AdaptiveRule = "beta"
    """beta: stop when P(the leading answer stays ahead) >= adaptive_confidence under a uniform Beta
    prior on the top two counts. supermajority: stop when the leader has >= supermajority of votes."""
    adaptive_confidence: float = 0.95
    supermajority: float = 0.75
    adaptive_first_wave: int = 4
    """Samples in the first wave; each later wave doubles the total (prefix-cache reuses the prompt)."""
    max_per_problem: int | None = None
    """compute_optimal: the most samples one problem of the batch may get (None: 4 * budget, <= 1024)."""
    hopeless_share: float = 0.25
    """compute_optimal: after 2 * adaptive_first_wave samples, a problem whose leading answer holds at most
    this share of them is taken to be beyond the model (Snell et al.: the hardest problems gain least)."""
    min_gain_per_sample: float = 0.002
    """compute_optimal: a problem whose estimated accuracy gain per extra sample is below this (a settled
    vote, or no answer standing out) gets only what the others leave of the batch budget."""
    step_separator: str = "\n"
    """Step-level search: a step ends at this string (kept in the context)."""
    max_steps: int = 8
    step_max_tokens: int = 64
    beam_width: int | None = None
    """Beams kept per round; None: max(1, budget // 4)."""
    pf_temperature: float = 1.0
    """Particle weights are softmax(logit(score) / pf_temperature)."""
    ess_threshold: float = 0.5
    """Resample when the effective sample size drops below ess_threshold * particles (1.0: always)."""
    confidence_top_logprobs: int = 5
    """Top logprobs per token used for the entropy-based confidence."""

    def __post_init__(self) -> None:
        require(isinstance(self.budget, int) and self.budget >= 1, "budget", self.budget,
                "must be an integer >= 1")
        require(self.budget <= 1024, "budget", self.budget, "must be <= 1024")
        require(isinstance(self.params, SamplingParams), "params", self.params, "must be SamplingParams")
        require(isinstance(self.k, int) and 1 <= self.k, "k", self.k, "must be an integer >= 1")
        require(0.0 <= self.bom_alpha <= 1.0, "bom_alpha", self.bom_alpha, "must be in [0, 1]")
        require(self.adaptive_rule in ("beta", "supermajority"), "adaptive_rule", self.adaptive_rule,
                "beta or supermajority")
        require(0.5 < self.adaptive_confidence < 1.0, "adaptive_confidence", self.adaptive_confidence,
                "must be in (0.5, 1)")
        require(0.5 < self.supermajority <= 1.0, "supermajority", self.supermajority, "must be in (0.5, 1]")
        require(self.adaptive_first_wave >= 1, "adaptive_first_wave", self.adaptive_first_wave, "must be >= 1")
        require(self.max_per_problem is None or 1 <= self.max_per_problem <= 1024, "max_per_problem",
                self.max_per_problem, "must be None or in [1, 1024]")
        require(0.0 <= self.hopeless_share < 1.0, "hopeless_share", self.hopeless_share, "must be in [0, 1)")
        require(0.0 <= self.min_gain_per_sample <= 1.0, "min_gain_per_sample", self.min_gain_per_sample,
                "must be in [0, 1]")
        require(bool(self.step_separator), "step_separator", self.step_separator, "must be non-empty")
        require(self.max_steps >= 1, "max_steps", self.max_steps, "must be >= 1")
        require(self.step_max_tokens >= 1, "step_max_tokens", self.step_max_tokens, "must be >= 1")
        require(self.beam_width is None or 1 <= self.beam_width <= self.budget, "beam_width",
                self.beam_width, f"must be None or in [1, budget={self.budget}]")
        require(self.pf_temperature > 0, "pf_temperature", self.pf_temperature, "must be > 0")
        require(0.0 <= self.ess_threshold <= 1.0, "ess_threshold", self.ess_threshold, "must be in [0, 1]")
        require(1 <= self.confidence_top_logprobs <= 20, "confidence_top_logprobs",
                self.confidence_top_logprobs, "must be in [1, 20]")


class Strategy(Controller, Protocol):
    """An inference-time scaling algorithm: a `Controller` (engine/dispatcher.py) whose request ids are
    `{controller_id}/...` and whose result is a `ScaleResult` (see the module doc)."""

    def owns(self, request_id: str) -> bool: ...

    def result(self) -> ScaleResult: ...
