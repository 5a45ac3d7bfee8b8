"""Model profiles `model -> keyword -> score` (+1 per right answer, -1 per wrong, summed over the keywords
of each validation question), measured costs, and the chosen aggregator, stored as one JSON file."""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from mixserve.config import ConfigError


@dataclass(frozen=True)
class ModelCost:
    """What one expert costs, measured while profiling (for budget-constrained recruitment)."""

    latency_s: float
    """Wall seconds per question (its share of one batched run over the validation set)."""
    memory_bytes: int
    """Resident bytes once loaded (weights + KV cache)."""


@dataclass
class Profiles:
    scores: dict[str, dict[str, int]]
    """model -> keyword -> score."""
    accuracy: dict[str, float] = field(default_factory=dict)
    """model -> validation accuracy."""
    costs: dict[str, ModelCost] = field(default_factory=dict)
    aggregator: str | None = None
    """The model that scored best on the synthetic aggregation benchmark."""
    aggregator_scores: dict[str, float] = field(default_factory=dict)

    @property
    def models(self) -> list[str]:
        return list(self.scores)

    def vocabulary(self) -> list[str]:
        return sorted({kw for profile in self.scores.values() for kw in profile})

    def to_json(self) -> dict[str, object]:
        return {"scores": self.scores, "accuracy": self.accuracy,
                "costs": {m: {"latency_s": c.latency_s, "memory_bytes": c.memory_bytes}
                          for m, c in self.costs.items()},
                "aggregator": self.aggregator, "aggregator_scores": self.aggregator_scores}

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_json(), indent=1, sort_keys=True))

    @staticmethod
    def load(path: str | Path) -> Profiles:
        p = Path(path)
        try:
            data = json.loads(p.read_text())
            scores = {str(m): {str(k): int(v) for k, v in kws.items()} for m, kws in data["scores"].items()}
            costs = {str(m): ModelCost(float(c["latency_s"]), int(c["memory_bytes"]))
                     for m, c in data.get("costs", {}).items()}
            return Profiles(scores, {str(m): float(a) for m, a in data.get("accuracy", {}).items()}, costs,
                            data.get("aggregator"), {str(m): float(s) for m, s in
                                                     data.get("aggregator_scores", {}).items()})
        except FileNotFoundError:
            raise
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ConfigError(f"invalid profiles file {p}: {type(exc).__name__}: {exc} (expected "
                              f"{{\"scores\": {{model: {{keyword: int}}}}, ...}})", field="profiles") from exc


def build_profiles(models: list[str], records: Iterable[tuple[str, list[str], bool]]) -> Profiles:
    """`records`: (model, question keywords, answered right?) -> +1/-1 per keyword per model."""
    scores: dict[str, dict[str, int]] = {m: {} for m in models}
    right: dict[str, list[bool]] = {m: [] for m in models}
    for model, keywords, correct in records:
        profile = scores[model]
        for kw in keywords:
            profile[kw] = profile.get(kw, 0) + (1 if correct else -1)
        right[model].append(correct)
    accuracy = {m: sum(r) / len(r) for m, r in right.items() if r}
    return Profiles(scores, accuracy)
