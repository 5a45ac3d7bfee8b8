"""Budgeted experts give bitwise the all-in-memory outputs, for every family, budget, policy, prefetch."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from mixserve.config import ExpertConfig
from mixserve.experts.budgeted import BudgetedExpertProvider
from mixserve.experts.pack import dtype_plan, write_pack
from mixserve.experts.setup import build_from_pack
from mixserve.experts.store import ExpertStore
from mixserve.experts.synthetic import SyntheticRouting, SyntheticRoutingConfig
from mixserve.layers.moe import set_route_source
from mixserve.loading.checkpoint import load_checkpoint
from tests.experts.conftest import Tiny
from tests.harness import greedy, prefill_logits

PROMPT = [3, 17, 99, 5, 100, 41, 7, 8, 120, 33, 64]
# (slots per layer: "min" = 1, or a share of the experts), eviction policy, predictor
SETTINGS = [("min", "lru", "none"), ("min", "lfru", "router"), (2, "lfu", "affinity"), (0.5, "lfru", "router"),
            (1.0, "lru", "router")]


def budget_bytes(pack: Path, slots: str | int | float, dtype: torch.dtype) -> int:
    store = ExpertStore(pack)
    slot = BudgetedExpertProvider.slot_sizes(store, dtype)
    per_layer = sum(slot.values())
    if slots == "min":
        return per_layer
    if isinstance(slots, int):
        return slots * per_layer
    return int(slots * per_layer * store.num_experts)


def budgeted(pack: Path, config: ExpertConfig, dtype: torch.dtype = torch.float32
             ) -> tuple[Any, BudgetedExpertProvider | None]:
    checkpoint = load_checkpoint(pack)
    model, provider = build_from_pack(checkpoint.hf_config, pack, config, dtype)
    model.load_weights(checkpoint.weights(dtype=dtype))
    return model.eval(), provider


@pytest.fixture(scope="module")
def packed(tiny: Tiny, tmp_path_factory: pytest.TempPathFactory) -> tuple[Tiny, Path]:
    return tiny, write_pack(tiny.path, tmp_path_factory.mktemp(f"{tiny.name}_pack"), progress=False)


@pytest.mark.parametrize("slots,policy,prefetch", SETTINGS)
def test_outputs_equal_all_in_memory(packed: tuple[Tiny, Path], slots: str | int | float, policy: str,
                                     prefetch: str) -> None:
    tiny, pack = packed
    ref_model = tiny.in_memory()
    ref_logits, ref_tokens = prefill_logits(ref_model, PROMPT), greedy(ref_model, PROMPT, 6)
    config = ExpertConfig(memory_budget=str(budget_bytes(pack, slots, torch.float32)), policy=policy,  # type: ignore[arg-type]
                          prefetch=prefetch)  # type: ignore[arg-type]
    model, provider = budgeted(pack, config)
    assert provider is not None
    try:
        if slots == "min":
            assert set(provider.capacity.values()) == {1}
        assert torch.equal(prefill_logits(model, PROMPT), ref_logits)  # 11 tokens: prefill waves when small
        assert greedy(model, PROMPT, 6) == ref_tokens
        provider.check()
        stats = provider.expert_stats()
        assert stats["expert_resident_bytes"] <= stats["expert_budget_bytes"]
        if prefetch != "none":
            assert stats["expert_prefetch_recall"] >= 0.0
    finally:
        provider.close()


def test_quantized_pack_equals_all_in_memory_quantized(olmoe: Tiny, olmoe_mixed_pack: Path) -> None:
    ref_model, none = budgeted(olmoe_mixed_pack, ExpertConfig())  # no budget: every expert decoded up front
    assert none is None
    ref = prefill_logits(ref_model, PROMPT)
    fp = prefill_logits(olmoe.in_memory(), PROMPT)
    assert not torch.equal(ref, fp) and torch.nn.functional.cosine_similarity(ref, fp).min() > 0.95
    for slots in ("min", 0.5):
        config = ExpertConfig(memory_budget=str(budget_bytes(olmoe_mixed_pack, slots, torch.float32)))
        model, provider = budgeted(olmoe_mixed_pack, config)
        assert provider is not None
        try:
            assert torch.equal(prefill_logits(model, PROMPT), ref)
            assert greedy(model, PROMPT, 4) == greedy(ref_model, PROMPT, 4)
        finally:
            provider.close()


def test_bfloat16_pack_equals_bfloat16_model(olmoe: Tiny, tmp_path: Path) -> None:
    pack = write_pack(olmoe.path, tmp_path / "bf16", choose=dtype_plan("bfloat16"), progress=False)
    ref = prefill_logits(olmoe.in_memory(torch.bfloat16), PROMPT, dtype=torch.bfloat16)
    config = ExpertConfig(memory_budget=str(budget_bytes(pack, 2, torch.bfloat16)))
    model, provider = budgeted(pack, config, torch.bfloat16)
    assert provider is not None and provider.slot_nbytes[0] == ExpertStore(pack).entry(0, 0).padded_nbytes
    try:
        assert torch.equal(prefill_logits(model, PROMPT, dtype=torch.bfloat16), ref)
    finally:
        provider.close()


def test_replayed_routing_is_identical_too(olmoe: Tiny, olmoe_pack: Path) -> None:
    cfg = SyntheticRoutingConfig((0, 1, 2), 8, 2, zipf_alpha=1.2, stickiness=0.5, affinity=0.5, seed=7)
    ref_model = olmoe.in_memory()
    set_route_source(ref_model, SyntheticRouting(cfg))
    ref = greedy(ref_model, PROMPT, 8)
    model, provider = budgeted(olmoe_pack, ExpertConfig(memory_budget="30%", prefetch="affinity"))
    assert provider is not None
    try:
        set_route_source(model, SyntheticRouting(cfg))
        assert greedy(model, PROMPT, 8) == ref
        set_route_source(model, None)
        assert greedy(model, PROMPT, 3) == greedy(olmoe.in_memory(), PROMPT, 3)
    finally:
        provider.close()
