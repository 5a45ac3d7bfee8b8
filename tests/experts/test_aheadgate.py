"""Learned d-layer-ahead gates: fitting recovers a linear routing, files round-trip, `refit-pregate --ahead`
writes one, and `--expert-prefetch gate|pregate` wire the fitted predictors into the budgeted provider
without changing a generated token."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
import transformers

from mixserve.experts.aheadgate import AheadGate
from mixserve.experts.moefy import MoefyConfig, moefy
from mixserve.experts.pregate_fit import RefitConfig, RouteRecord, ahead_scores, fit_ahead_gate, refit_pregate
from mixserve.experts.store import PackError
from mixserve.llm import LLM
from mixserve.sampling_params import SamplingParams
from tests.experts.conftest import write_tokenizer

VOCAB = 128


@pytest.fixture(scope="module")
def moe(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random dense llama moefied to 8 experts, top-2, 3 layers (pre-gate and ahead gate fitted)."""
    root = tmp_path_factory.mktemp("aheadgate")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                                   num_hidden_layers=3, intermediate_size=128, initializer_range=0.1,
                                   tie_word_embeddings=True)
    transformers.LlamaForCausalLM(cfg).save_pretrained(root / "dense")
    write_tokenizer(root / "dense", VOCAB)
    rng = random.Random(0)
    (root / "calib.txt").write_text(" ".join(f"t{rng.randrange(3, VOCAB)}" for _ in range(900)))
    moefy(MoefyConfig(str(root / "dense"), str(root / "moe"), 8, 2, 0.25,
                      calibration_files=(str(root / "calib.txt"),), max_calibration_tokens=512, window=64,
                      pregate_tokens=768), progress=False)
    return root / "moe"


def test_fit_recovers_a_linear_routing() -> None:
    """Layer i+1 routes by a linear function of layer i's input: the 1-ahead gate finds it (recall 1)."""
    gen = torch.Generator().manual_seed(0)
    inputs = [torch.randn(400, 16, generator=gen) for _ in range(3)]
    true = [torch.randn(8, 16, generator=gen) for _ in range(2)]
    routes = [torch.zeros(400, 2, dtype=torch.long)] + [(inputs[i] @ true[i].T).topk(2, dim=1).indices
                                                        for i in range(2)]
    rec = RouteRecord(inputs[0], routes, [], [400], inputs)
    gate = fit_ahead_gate(rec, 8, 1, 3)
    scores, targets = ahead_scores(gate, rec)
    from mixserve.experts.pregate import token_recall

    assert min(token_recall(scores, targets, 3)) > 0.97
    # as an ExpertPredictor: layer 0's input names layer 1's experts; the last layer predicts nothing
    nxt, ranked = gate.predict(0, inputs[0][:1], routes[0][:1])  # type: ignore[misc]
    assert nxt == 1 and set(routes[1][0].tolist()) <= set(ranked) and len(ranked) == 3
    assert gate.predict(2, inputs[2][:1], routes[2][:1]) is None


def test_file_round_trip_and_errors(tmp_path: Path) -> None:
    gate = AheadGate(torch.randn(2, 8, 4), [0, 1, 2], 1, [2, 5])
    gate.save(tmp_path)
    back = AheadGate.load(tmp_path)
    assert back.distance == 1 and back.top_m == [2, 5] and back.layer_ids == [0, 1, 2]
    torch.testing.assert_close(back.weight, gate.weight)
    assert AheadGate.load(tmp_path, top_m=3).top_m == [3, 3]
    with pytest.raises(ValueError, match=r"distance=3 must be in \[1, 2\]"):
        AheadGate(torch.randn(0, 8, 4), [0, 1, 2], 3, 2)
    with pytest.raises(ValueError, match=r"expected \[2, num_experts, hidden_size\]"):
        AheadGate(torch.randn(3, 8, 4), [0, 1, 2], 1, 2)
    with pytest.raises(ValueError, match=r"top_m=\[2, 9\] must be in \[1, num_experts=8\]"):
        AheadGate(torch.randn(2, 8, 4), [0, 1, 2], 1, [2, 9])
    with pytest.raises(FileNotFoundError, match="no ahead gate"):
        AheadGate.load(tmp_path / "missing")
    with pytest.raises(ValueError, match="--ahead=-1"):
        RefitConfig("m", ahead=-1)


def test_refit_writes_the_ahead_gate(moe: Path) -> None:
    gate = AheadGate.load(moe)  # written by moefy's own refit (ahead = 1 by default)
    assert gate.distance == 1 and len(gate.top_m) == 2 and gate.layer_ids == [0, 1, 2]
    report = refit_pregate(RefitConfig(str(moe), calibration_files=(str(moe.parent / "calib.txt"),),
                                       max_calibration_tokens=512, window=64, ahead=2, target_recall=0.9))
    assert report.ahead == 2 and len(report.ahead_top_m) == 1 and AheadGate.load(moe).distance == 2
    assert report.ahead_recall[0] >= 0.9 - 1e-9 or report.ahead_top_m[0] == 8
    assert json.loads((moe / "pregate.json").read_text())["report"]["ahead_top_m"] == report.ahead_top_m
    with pytest.raises(ValueError, match="--ahead=3: the model has 3 MoE layers"):
        refit_pregate(RefitConfig(str(moe), calibration_files=(str(moe.parent / "calib.txt"),),
                                  max_calibration_tokens=512, window=64, ahead=3))
    refit_pregate(RefitConfig(str(moe), calibration_files=(str(moe.parent / "calib.txt"),),
                              max_calibration_tokens=512, window=64))  # back to d = 1 for the tests below


@pytest.mark.parametrize("prefetch", ["gate", "pregate"])
def test_engine_prefetch_from_fitted_gates(moe: Path, tmp_path: Path, prefetch: str) -> None:
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    prompt = [5, 17, 99, 3, 42, 42, 7]
    ref = LLM(str(moe), cache_dir=tmp_path, kv_cache_bytes=1 << 22).generate([prompt], params)[0].outputs[0]
    llm = LLM(str(moe), cache_dir=tmp_path, kv_cache_bytes=1 << 22, expert_memory_budget="50%",
              expert_prefetch=prefetch)
    out = llm.generate([prompt], params)[0].outputs[0]
    assert out.token_ids == ref.token_ids  # prediction only moves reads, never the result
    stats = llm.expert_stats()
    assert stats["expert_prefetch_issued"] > 0 and 0 < stats["expert_prefetch_recall"] <= 1


def test_engine_prefetch_gate_missing(moe: Path, tmp_path: Path) -> None:
    import shutil

    bare = tmp_path / "bare"
    shutil.copytree(moe, bare)
    (bare / "aheadgate.safetensors").unlink()
    with pytest.raises(PackError, match="needs aheadgate.safetensors.*refit-pregate"):
        LLM(str(bare), cache_dir=tmp_path, kv_cache_bytes=1 << 22, expert_memory_budget="50%",
            expert_prefetch="gate")


def test_prediction_trace_replays_per_layer_and_all_at_once(tmp_path: Path) -> None:
    from mixserve.experts.prediction_trace import (
        PredictionTrace,
        ReplayedPredictor,
        load_predictions,
        save_predictions,
    )

    per_layer = PredictionTrace("gate", False, [{1: [3, 4], 2: [5]}, {1: [0], 2: [7, 1], 9: [2]}])
    at_once = PredictionTrace("pregate", True, [{0: [1], 1: [2], 2: [3], 9: [4]}])
    save_predictions([per_layer, at_once], tmp_path / "p.json")
    loaded = load_predictions(tmp_path / "p.json")
    assert loaded["gate"] == per_layer and loaded["pregate"] == at_once
    x, ids = torch.zeros(1, 4), torch.zeros(1, 1, dtype=torch.long)
    replay = ReplayedPredictor(loaded["gate"].restrict([0, 1, 2]), [0, 1, 2])
    step0 = [replay.predict(layer, x, ids) for layer in (0, 1, 2)]
    step1 = [replay.predict(layer, x, ids) for layer in (0, 1, 2)]
    assert step0 == [(1, [3, 4]), (2, [5]), None] and step1 == [(1, [0]), (2, [7, 1]), None]
    with pytest.raises(ValueError, match="step 2 asked, the trace has 2"):
        replay.predict(0, x, ids)
    whole = ReplayedPredictor(loaded["pregate"], [0, 1, 2])
    assert whole.predict_step(x) == {0: [1], 1: [2], 2: [3]}  # layer 9 is not the replaying model's
