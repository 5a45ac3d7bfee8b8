"""Per-question recruitment (Symbolic-MoE): local suitability x global competence, then k draws.

- local: `rank[m] = sum(profile_m[kw] for kw in keywords if kw in profile_m)`, only models whose profile
  holds some keyword of the question;
- global: `g = normalize(sum of profile_m, T)`: shift by `-min + 1` when any is negative, raise to 1/T,
  renormalise (T = 0.5 squares);
- weights: `rank[m] * g[m]` over models with positive rank; when none is positive, every ranked model
  after shifting ranks by `-min + 1`; probabilities are the weights renormalised;
- k draws with replacement (the released code's default) or without; no ranked model: k uniform draws.

MoE²-style budget: models whose measured latency or memory exceeds the request's budget are not eligible.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from mixserve.config import ConfigError
from mixserve.mixture.profiles import ModelCost, Profiles


@dataclass(frozen=True)
class RecruitConfig:
    """How experts are drawn for a question."""

    k: int = 3
    """Experts per question (slots)."""
    temperature: float = 0.5
    """Temperature of the global-competence normalisation (the paper's 0.5)."""
    with_replacement: bool = True
    """Draw with replacement (the released code: a strong model may fill several slots)."""
    max_latency_s: float | None = None
    """Budget: only models measured at most this many seconds per question are eligible."""
    max_memory_bytes: int | None = None
    """Budget: only models whose resident size is at most this are eligible."""

    def __post_init__(self) -> None:
        if self.k < 1:
            raise ConfigError(f"invalid config k={self.k!r}: must be >= 1", field="k")
        if self.temperature <= 0:
            raise ConfigError(f"invalid config temperature={self.temperature!r}: must be > 0", field="temperature")


def normalize_to_probability(values: Mapping[str, float], temperature: float) -> dict[str, float]:
    low = min(values.values())
    shifted = {m: (v - low + 1 if low < 0 else v) for m, v in values.items()}
    scaled = {m: v ** (1 / temperature) for m, v in shifted.items()}
    total = sum(scaled.values())
    if total <= 0:
        return {m: 1 / len(values) for m in values}
    return {m: v / total for m, v in scaled.items()}


def eligible(models: Sequence[str], costs: Mapping[str, ModelCost], config: RecruitConfig) -> list[str]:
    """Models within the latency/memory budget (a model without a measured cost is eligible)."""
    def fits(m: str) -> bool:
        c = costs.get(m)
        if c is None:
            return True
        return ((config.max_latency_s is None or c.latency_s <= config.max_latency_s)
                and (config.max_memory_bytes is None or c.memory_bytes <= config.max_memory_bytes))
    return [m for m in models if fits(m)]


def recruit_probabilities(profiles: Profiles, keywords: Sequence[str],
                          config: RecruitConfig = RecruitConfig()) -> dict[str, float]:
    """The probability of each model per draw; {} when no eligible model knows any keyword."""
    models = eligible(profiles.models, profiles.costs, config)
    if not models:
        raise ConfigError(f"no model fits the budget (max_latency_s={config.max_latency_s}, "
                          f"max_memory_bytes={config.max_memory_bytes})", field="budget")
    strength = normalize_to_probability({m: float(sum(profiles.scores[m].values())) for m in models},
                                        config.temperature)
    rank: dict[str, float] = {}
    for kw in keywords:
        for m in models:
            if kw in profiles.scores[m]:
                rank[m] = rank.get(m, 0.0) + profiles.scores[m][kw]
    if not rank:
        return {}
    positive = {m: s for m, s in rank.items() if s > 0}
    if not positive:
        low = min(rank.values())
        positive = {m: s - low + 1 for m, s in rank.items()}
    weights = {m: s * strength[m] for m, s in positive.items()}
    total = sum(weights.values())
    if total <= 0:
        return {m: 1 / len(weights) for m in weights}
    return {m: w / total for m, w in weights.items()}


def recruit(profiles: Profiles, keywords: Sequence[str], rng: random.Random,
            config: RecruitConfig = RecruitConfig()) -> list[str]:
    """k experts for one question (see the module docstring)."""
    probs = recruit_probabilities(profiles, keywords, config)
    if not probs:
        return rng.choices(eligible(profiles.models, profiles.costs, config), k=config.k)
    models, weights = list(probs), list(probs.values())
    if config.with_replacement:
        return rng.choices(models, weights=weights, k=config.k)
    picked: list[str] = []
    while models and len(picked) < config.k:
        m = rng.choices(models, weights=weights, k=1)[0]
        i = models.index(m)
        picked.append(models.pop(i))
        weights.pop(i)
    return picked
