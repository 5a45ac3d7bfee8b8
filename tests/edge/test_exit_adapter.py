"""The fitted exit adapter: least-squares optimal on its training positions (never worse than the
identity map, the default head), saved and loaded beside the model, refused for another split, and
used by the edge as its exit head."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mixserve.edge.exit_adapter import ExitAdapter, FitConfig, _unit_rms, collect, default_path, fit_exit_adapter
from tests.edge.conftest import PROMPT, Split

PROMPTS = [[(7 * i + j) % 250 + 3 for j in range(5 + i % 4)] for i in range(6)]


def test_fit_is_least_squares_and_round_trips(llama: Split, tmp_path: Path) -> None:
    config = FitConfig(max_tokens=16, ridge=0.0, holdout=0.34)  # 4 x >= 20 positions > 65 unknowns
    adapter = fit_exit_adapter(llama.model, llama.cfg, 2, PROMPTS, config)
    meta = adapter.meta
    positions = [len(p) + 16 - 1 for p in PROMPTS]  # the prompt, then one position per sampled token
    assert meta["num_train_positions"] == sum(positions[2:]) and meta["num_test_positions"] == sum(positions[:2])
    assert 0.0 <= meta["agreement_default_head"] <= 1.0 and 0.0 <= meta["agreement_adapter"] <= 1.0
    train = collect(llama.model, PROMPTS, 2, config)[2:]
    x = _unit_rms(torch.cat([s[0] for s in train]))
    y = _unit_rms(torch.cat([s[1] for s in train]))
    fitted = (x @ adapter.weight + adapter.bias - y).pow(2).sum()
    assert fitted <= (x - y).pow(2).sum()  # the identity (default head's input) is one candidate
    perturbed = (x @ (adapter.weight + 1e-2 * torch.randn_like(adapter.weight)) + adapter.bias - y).pow(2).sum()
    assert fitted <= perturbed

    path = default_path(llama.path, 2)
    assert path == llama.path / "exit2.safetensors"
    adapter.save(path)
    loaded = ExitAdapter.load(path, llama.model, llama.cfg, 2)
    h = torch.randn(3, 64)
    assert torch.equal(loaded.weight, adapter.weight) and torch.equal(loaded.bias, adapter.bias)
    assert torch.allclose(loaded(h), adapter(h), atol=1e-5) and loaded.meta == meta
    with pytest.raises(ValueError, match="split layer 2"):
        ExitAdapter.load(path, llama.model, llama.cfg, 1)


def test_edge_uses_the_adapter_as_its_exit_head(llama: Split) -> None:
    adapter = fit_exit_adapter(llama.model, llama.cfg, 2, PROMPTS, FitConfig(max_tokens=8))
    edge, _ = llama.edge(None, 2, tau=0.0)
    edge.exit_head = adapter
    result = edge.generate(PROMPT, 6, ignore_eos=True)
    from mixserve.edge.stage import SequenceStage
    stage, ids, want = SequenceStage(llama.model, 0, 2, 64, torch.float32), PROMPT, []
    with torch.inference_mode():
        for _ in range(6):
            want.append(int(adapter(stage.forward(token_ids=ids)[-1:]).argmax(-1)))
            ids = want[-1:]
    assert result.token_ids == want
