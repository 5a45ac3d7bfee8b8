"""Wiring a real pool: model specs -> `ModelPool[LLM]` and the expert factory over it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mixserve.config import ConfigError, ExpertBudget
from mixserve.mixture.experts import Expert, LLMExpert
from mixserve.mixture.models import LLMLoader, ModelSpec, load_models_file, spec_from_arg
from mixserve.mixture.pool import ModelPool
from mixserve.sampling_params import SamplingParams


def parse_budget(text: str) -> int:
    """`4GiB`, `900MB`, `1000000` -> bytes (fractions make no sense for a pool of whole models)."""
    budget = ExpertBudget.parse(text, "pool_memory_budget")
    if budget.num_bytes is None:
        raise ConfigError(f"invalid config pool_memory_budget={text!r}: give bytes with a unit (4GiB, 900MB)",
                          field="pool_memory_budget")
    return budget.num_bytes


def model_specs(models: list[str] | None, models_file: str | None) -> list[ModelSpec]:
    specs = load_models_file(models_file) if models_file else []
    specs += [spec_from_arg(m) for m in models or []]
    if not specs:
        raise ConfigError("no models: give --model NAME[=PATH] (repeatable) or --models-file FILE", field="model")
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise ConfigError(f"invalid config models={names}: duplicate names (use NAME=PATH)", field="model")
    return specs


def real_pool(specs: list[ModelSpec], budget_bytes: int, cache_dir: str | Path | None = None
              ) -> tuple[ModelPool[Any], LLMLoader]:
    loader = LLMLoader(specs, cache_dir=cache_dir)
    return ModelPool([s.name for s in specs], loader, budget_bytes), loader


def llm_expert_factory(params: SamplingParams) -> Any:
    """`expert_of(name, handle)` for pools of `LLM`s."""
    def expert_of(name: str, handle: Any) -> Expert:
        return LLMExpert(handle, params)
    return expert_of
