"""The budget knob: parsing, resolution and config errors (no torch)."""

from __future__ import annotations

import pytest

from mixserve.config import ConfigError, EngineConfig, ExpertBudget, ExpertConfig


@pytest.mark.parametrize("text,num_bytes,fraction", [
    ("2GiB", 2 << 30, None), ("512MB", 512 * 10**6, None), ("1.5 GiB", 3 << 29, None),
    ("1000", 1000, None), ("64kib", 64 << 10, None), ("25%", None, 0.25), ("0.25", None, 0.25),
    ("1.0", None, 1.0), ("100%", None, 1.0),
])
def test_parse(text: str, num_bytes: int | None, fraction: float | None) -> None:
    assert ExpertBudget.parse(text) == ExpertBudget(num_bytes, fraction)


@pytest.mark.parametrize("text", ["", "abc", "0", "0.0", "150%", "1.5", "2XB", "-1GiB", "2 GiB extra"])
def test_bad_budget_names_field_and_value(text: str) -> None:
    with pytest.raises(ConfigError, match=r"expert_memory_budget=.*" + repr(text)[1:-1]):
        ExpertBudget.parse(text)
    with pytest.raises(ConfigError, match="experts.memory_budget"):
        ExpertConfig(memory_budget=text)


def test_resolve() -> None:
    assert ExpertBudget.parse("10%").resolve(1000) == 100
    assert ExpertBudget.parse("2KiB").resolve(10) == 2048
    assert ExpertConfig().budget is None and ExpertConfig(memory_budget="50%").budget == ExpertBudget(None, 0.5)


@pytest.mark.parametrize("field,value", [("policy", "mru"), ("prefetch", "oracle"), ("prefetch_top_m", 0),
                                         ("io_threads", 0)])
def test_bad_expert_config(field: str, value: object) -> None:
    with pytest.raises(ConfigError, match=f"experts.{field}"):
        ExpertConfig(**{field: value})  # type: ignore[arg-type]


def test_engine_config_has_experts() -> None:
    assert EngineConfig().experts == ExpertConfig()
