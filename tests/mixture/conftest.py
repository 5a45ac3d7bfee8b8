"""Synthetic experts with known per-skill accuracy, a pool over them, and helpers."""

from __future__ import annotations

from typing import Any

from mixserve.mixture.experts import Expert, SyntheticExpert
from mixserve.mixture.pool import LoadResult, ModelPool

KEYWORDS = {"arithmetic": ("arithmetic", "addition"), "sorting": ("sorting", "ordering"),
            "gcd": ("number theory", "gcd")}


class SyntheticLoader:
    """Each 'model' is a SyntheticExpert of a fixed size."""

    def __init__(self, experts: list[SyntheticExpert], nbytes: int = 100) -> None:
        self.experts = {e.name: e for e in experts}
        self.nbytes = nbytes
        self.loads: list[str] = []

    def estimate_bytes(self, name: str) -> int:
        return self.nbytes

    def load(self, name: str) -> LoadResult[SyntheticExpert]:
        self.loads.append(name)
        return LoadResult(self.experts[name], self.nbytes)

    def unload(self, name: str, handle: Any) -> None:
        pass


def expert_of(name: str, handle: Any) -> Expert:
    return handle  # type: ignore[no-any-return]


def synthetic_pool(accuracies: dict[str, dict[str, float]], budget_models: int = 1,
                   aggregate_accuracy: float | None = None) -> tuple[ModelPool[Any], SyntheticLoader]:
    experts = [SyntheticExpert(name, acc, index=i, keywords=KEYWORDS, aggregate_accuracy=aggregate_accuracy)
               for i, (name, acc) in enumerate(accuracies.items())]
    loader = SyntheticLoader(experts)
    return ModelPool(list(accuracies), loader, budget_bytes=100 * budget_models), loader
