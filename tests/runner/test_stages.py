"""A model split over runners that own contiguous layer ranges == one runner with the whole model.

Each stage runner allocates KV caches for its own layers only and hands `StageBoundary` (the step and
the hidden states) to the next; the last one samples. Driven through the real engine (prefill in
chunks of two sequences, then decode steps), greedy tokens and every logits row the head computes
must be bitwise equal to the whole-model run, for every family.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers
from safetensors.torch import load_file

from mixserve.config import CacheConfig, EngineConfig, SchedulerConfig
from mixserve.engine.engine import Engine, ModelInfo, RunnerOutput
from mixserve.engine.scheduler import SchedulerOutput
from mixserve.models.base import KVCacheSpec, LayerKVSpec, build_model
from mixserve.runner.model_runner import TorchModelRunner, allocate_kv_caches, kv_bytes_per_block
from mixserve.runner.stage import StageBoundary
from mixserve.sampling_params import SamplingParams
from tests.engine.fake import FakeTokenizer, run_all
from tests.models import test_dense_parity as dense
from tests.models import test_moe_parity as moe

BLOCK_SIZE, NUM_BLOCKS = 4, 64
PROMPTS = [[5, 17, 99, 3, 250, 42, 42, 7, 128, 64, 1], [9, 190, 4, 77, 150, 21, 60]]
FAMILIES = sorted(dense.CASES) + sorted(moe.FAMILIES)


def _hf_config(name: str) -> Any:
    if name in dense.CASES:
        config_cls, extra = dense.CASES[name]
        return config_cls(**dense.COMMON, **extra)
    prefix, kwargs = moe.FAMILIES[name]
    return getattr(transformers, f"{prefix}Config")(**moe.COMMON, **kwargs)


@pytest.fixture(scope="module", params=FAMILIES)
def model(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Any:
    torch.manual_seed(0)
    hf = transformers.AutoModelForCausalLM.from_config(_hf_config(request.param))
    path: Path = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(path)
    ours: Any = build_model(json.loads((path / "config.json").read_text()), torch.float32)
    ours.load_weights(load_file(path / "model.safetensors").items())
    return ours.eval()


class Pipeline:
    """Runs one step through stage runners in layer order (what a multi-device deployment would do)."""

    def __init__(self, stages: list[TorchModelRunner]) -> None:
        self.stages = stages

    def execute(self, out: SchedulerOutput) -> RunnerOutput:
        step: SchedulerOutput | StageBoundary = out
        for stage in self.stages[:-1]:
            boundary = stage.execute_stage(step)
            step = StageBoundary(boundary.step, boundary.hidden.clone(), boundary.layer)  # nothing shared
        return self.stages[-1].execute(step)


def _run(model: Any, ranges: list[tuple[int, int]]) -> tuple[dict[str, list[int]], list[torch.Tensor]]:
    """Greedy tokens per request and every logits tensor the head produced, in order."""
    logits: list[torch.Tensor] = []
    head = type(model).head
    model.head = lambda hidden: logits.append(head(model, hidden)) or logits[-1]
    try:
        stages = [TorchModelRunner(model, NUM_BLOCKS, BLOCK_SIZE, torch.float32, (0,), layers=r) for r in ranges]
        for stage, (a, b) in zip(stages, ranges):
            assert len(stage.kv_caches) == b - a  # only the owned layers' caches
        config = EngineConfig(cache=CacheConfig(block_size=BLOCK_SIZE, num_blocks=NUM_BLOCKS),
                              scheduler=SchedulerConfig(max_num_batched_tokens=8))  # chunked prefill
        info = ModelInfo(max_model_len=64, vocab_size=int(model.args.vocab_size), eos_token_ids=(0,),
                         num_blocks=NUM_BLOCKS)
        engine = Engine(config, Pipeline(stages), FakeTokenizer(), info)
        params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
        for i, prompt in enumerate(PROMPTS):
            engine.add_request(f"r{i}", prompt, params)
        tokens = {rid: samples[0] for rid, samples in run_all(engine).items()}
    finally:
        del model.head
    return tokens, logits


def _splits(num_layers: int) -> list[list[tuple[int, int]]]:
    two = [[(0, k), (k, num_layers)] for k in range(1, num_layers)]
    return two + ([[(i, i + 1) for i in range(num_layers)]] if num_layers > 2 else [])


def test_split_runners_match_whole_model_bitwise(model: Any) -> None:
    num_layers = model.kv_cache_spec().end
    want_tokens, want_logits = _run(model, [(0, num_layers)])
    assert all(len(t) == 6 for t in want_tokens.values()) and len(want_logits) > 6
    for ranges in _splits(num_layers):
        tokens, logits = _run(model, ranges)
        assert tokens == want_tokens, ranges
        assert len(logits) == len(want_logits)
        for got, want in zip(logits, want_logits):
            assert torch.equal(got, want), ranges


def test_stage_runners_refuse_the_wrong_input(model: Any) -> None:
    num_layers = model.kv_cache_spec().end
    first = TorchModelRunner(model, NUM_BLOCKS, BLOCK_SIZE, torch.float32, (0,), layers=(0, 1))
    last = TorchModelRunner(model, NUM_BLOCKS, BLOCK_SIZE, torch.float32, (0,), layers=(1, num_layers))
    out = SchedulerOutput(seqs=[], copies=[])
    boundary = StageBoundary(out, torch.zeros(0, int(model.args.hidden_size)), 1)
    with pytest.raises(ValueError, match="cannot sample"):
        first.execute(out)
    with pytest.raises(ValueError, match="previous stage's hidden states"):
        last.execute(out)
    with pytest.raises(ValueError, match="end before layer 2"):
        last.execute(StageBoundary(out, boundary.hidden, 2))
    with pytest.raises(ValueError, match="outside"):
        TorchModelRunner(model, NUM_BLOCKS, BLOCK_SIZE, torch.float32, (0,), layers=(0, num_layers + 1))


def test_kv_spec_allows_different_k_and_v_head_sizes() -> None:
    spec = KVCacheSpec((LayerKVSpec(2, 16, 8), LayerKVSpec(1, 32, 32), LayerKVSpec(4, 8, 4)))
    part = spec.slice(1, 3)
    assert (part.start, part.end, part.layers) == (1, 3, spec.layers[1:])
    caches = allocate_kv_caches(part, num_blocks=3, block_size=4, dtype=torch.bfloat16)
    assert [(k.shape, v.shape) for k, v in caches] == [((12, 1, 32), (12, 1, 32)), ((12, 4, 8), (12, 4, 4))]
    assert kv_bytes_per_block(part, 4, torch.bfloat16) == sum(k[:4].nbytes + v[:4].nbytes for k, v in caches)
    with pytest.raises(ValueError, match="empty or outside"):
        spec.slice(2, 2)
    with pytest.raises(ValueError, match=">= 1"):
        LayerKVSpec(2, 0, 8)
