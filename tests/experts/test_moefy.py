"""`moefy` on a tiny random dense llama: the written Qwen2-MoE folder loads in transformers and mixserve
with the same logits; with K = E it computes the dense function; bad arguments get clear errors."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers

from mixserve.experts.moefy import MoefyConfig, moefy, plan_sizes
from mixserve.experts.moefy_calib import calibration_text, forward_logits, module_docstrings
from mixserve.experts.moefy_split import balanced_kmeans, split_neurons
from mixserve.experts.pregate import PreGate, fit_pregate, step_recall
from mixserve.loading.checkpoint import load_checkpoint
from mixserve.models.base import build_model
from tests.experts.conftest import save_tiny, write_tokenizer

VOCAB = 128


@pytest.fixture(scope="module")
def dense(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random dense llama (intermediate 128) with a word-level tokenizer, and calibration text."""
    root = tmp_path_factory.mktemp("moefy")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                                   num_hidden_layers=2, intermediate_size=128, initializer_range=0.1,
                                   tie_word_embeddings=True)
    transformers.LlamaForCausalLM(cfg).save_pretrained(root / "dense")
    write_tokenizer(root / "dense", VOCAB)
    rng = random.Random(0)
    (root / "calib.txt").write_text(" ".join(f"t{rng.randrange(3, VOCAB)}" for _ in range(600)))
    return root / "dense"


def _moefy(dense: Path, out: Path, e: int, k: int, f: float, method: str = "coactivation") -> Path:
    moefy(MoefyConfig(str(dense), str(out), e, k, f, method=method,  # type: ignore[arg-type]
                      calibration_files=(str(dense.parent / "calib.txt"),), max_calibration_tokens=512,
                      window=64), progress=False)
    return out


def _mixserve(path: Path) -> Any:
    ckpt = load_checkpoint(path)
    model = build_model(ckpt.hf_config, torch.float32)
    model.load_weights(ckpt.weights(dtype=torch.float32))
    return model.eval()


def _hf(path: Path, ids: list[int]) -> torch.Tensor:
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0]


IDS = [5, 17, 99, 3, 42, 42, 7, 120, 64, 33, 8, 91, 12]


@pytest.mark.parametrize("shared", [0.0, 0.25])
def test_all_experts_active_is_the_dense_function(dense: Path, tmp_path: Path, shared: float) -> None:
    moe = _moefy(dense, tmp_path / "moe", 4, 4, shared)
    want = forward_logits(_mixserve(dense), IDS)
    got = forward_logits(_mixserve(moe), IDS)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(_hf(moe, IDS), got, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("method", ["coactivation", "kmeans"])
def test_sparse_checkpoint_matches_transformers(dense: Path, tmp_path: Path, method: str) -> None:
    moe = _moefy(dense, tmp_path / "moe", 8, 2, 0.25, method)
    config = json.loads((moe / "config.json").read_text())
    assert (config["model_type"], config["num_experts"], config["num_experts_per_tok"]) == ("qwen2_moe", 8, 2)
    assert config["shared_expert_intermediate_size"] == 32 and config["moe_intermediate_size"] == 12
    got = forward_logits(_mixserve(moe), IDS)
    torch.testing.assert_close(_hf(moe, IDS), got, atol=2e-5, rtol=1e-5)
    # sparse: no longer the dense function, but close to it
    want = forward_logits(_mixserve(dense), IDS)
    assert not torch.allclose(got, want, atol=1e-3)
    report = json.loads((moe / "moefy.json").read_text())["report"]
    assert len(report["router_recall"]) == 2 and all(0 < r <= 1 for r in report["router_recall"])


def test_bad_arguments(dense: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="--top-k=5 must be in"):
        MoefyConfig(str(dense), str(tmp_path / "o"), 4, 5)
    with pytest.raises(ValueError, match="--shared-fraction"):
        MoefyConfig(str(dense), str(tmp_path / "o"), 4, 2, shared_fraction=1.0)
    with pytest.raises(ValueError, match="does not divide the 96 routed neurons"):
        plan_sizes(128, 7, 0.25)
    with pytest.raises(ValueError, match="does not divide the 128 routed neurons"):
        _moefy(dense, tmp_path / "o", 256, 2, 0.0)
    moe_src = save_tiny("qwen2_moe", tmp_path / "already")
    with pytest.raises(ValueError, match="already an MoE model"):
        _moefy(moe_src.path, tmp_path / "o2", 4, 2, 0.0)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    with pytest.raises(ValueError, match="not empty"):
        _moefy(dense, tmp_path / "full", 4, 2, 0.0)


def test_split_is_a_balanced_partition() -> None:
    torch.manual_seed(0)
    groups = balanced_kmeans(torch.randn(60, 5), 6)
    assert groups.shape == (6, 10) and sorted(groups.flatten().tolist()) == list(range(60))
    h = torch.randn(200, 48)
    for method in ("coactivation", "kmeans"):
        split = split_neurons(h, torch.randn(48, 16), 4, 8, method)  # type: ignore[arg-type]
        ids = split.shared.tolist() + split.experts.flatten().tolist()
        assert split.experts.shape == (4, 10) and sorted(ids) == list(range(48))
        assert set(split.shared.tolist()) == set(h.abs().mean(0).topk(8).indices.tolist())


def test_default_calibration_text_is_fixed_and_disjoint_from_held_out() -> None:
    cal = calibration_text()
    assert cal.source == "stdlib-docstrings" and len(cal.texts) > 20
    assert cal.sha256 == calibration_text().sha256
    assert sum(map(len, cal.texts)) > 100_000
    held_out = module_docstrings(["csv", "heapq"])
    assert len(held_out) == 2 and not set(held_out) & set(cal.texts)


def test_pregate_is_written_and_predicts_every_layer(dense: Path, tmp_path: Path) -> None:
    moe = _moefy(dense, tmp_path / "moe", 8, 2, 0.25)
    gate = PreGate.load(moe, top_m=2)
    assert gate.layer_ids == [0, 1] and gate.weight.shape == (2, 8, 64)
    predicted = gate.predict_step(torch.randn(3, 64))
    assert sorted(predicted) == [0, 1] and all(1 <= len(v) <= 6 for v in predicted.values())
    report = json.loads((moe / "moefy.json").read_text())["report"]
    assert all(0 < r <= r2 <= 1 for r, r2 in zip(report["pregate_recall"], report["pregate_recall_2k"]))


def test_fit_pregate_recovers_a_linear_routing() -> None:
    torch.manual_seed(0)
    x0, true = torch.randn(400, 16), torch.randn(3, 4, 16)
    routes = [torch.einsum("th,eh->te", x0, true[i]).topk(1, dim=1).indices for i in range(3)]
    gate = PreGate(fit_pregate(x0, routes, 4), [0, 1, 2], top_m=1)
    hits = [float((gate.scores(x0)[i].argmax(1) == routes[i][:, 0]).float().mean()) for i in range(3)]
    assert min(hits) > 0.8
    assert step_recall({0: [1, 2]}, {0: torch.tensor([[1], [3]])}) == {0: 0.5}


def test_cli(dense: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from mixserve.cli import main

    out = tmp_path / "cli"
    assert main(["moefy", str(dense), str(out), "-E", "4", "-K", "2", "--shared-fraction", "0.25",
                 "--calibration", str(dense.parent / "calib.txt"), "--calibration-tokens", "256"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["num_experts"] == 4 and summary["expert_neurons"] == 24 and (out / "pregate.safetensors").is_file()
    assert main(["moefy", str(dense), str(tmp_path / "bad"), "-E", "4", "-K", "8"]) == 2
    assert "--top-k=8 must be in" in capsys.readouterr().err


def _own_routing(moe: Path, calib: Path) -> Any:
    """The moefied model's own routing of the calibration text (the windows moefy used)."""
    from mixserve.experts.moefy_calib import token_windows
    from mixserve.experts.pregate_fit import load_moe, record_routes

    model, ckpt = load_moe(moe)
    windows = token_windows([ckpt.tokenizer.encode(calib.read_text())], 64, 512)
    return record_routes(model, windows)


def test_refit_on_own_routing_beats_the_dense_fit(dense: Path, tmp_path: Path) -> None:
    from mixserve.experts.pregate import token_recall
    from mixserve.experts.pregate_fit import RefitConfig, refit_pregate

    moe = tmp_path / "moe"
    moefy(MoefyConfig(str(dense), str(moe), 8, 2, 0.25, calibration_files=(str(dense.parent / "calib.txt"),),
                      max_calibration_tokens=512, window=64, pregate_from="dense"), progress=False)
    rec = _own_routing(moe, dense.parent / "calib.txt")
    old = token_recall(PreGate.load(moe, top_m=2).scores(rec.x0), rec.routes, 2)
    report = refit_pregate(RefitConfig(str(moe), calibration_files=(str(dense.parent / "calib.txt"),),
                                       max_calibration_tokens=512, window=64, target_recall=0.9))
    new_gate = PreGate.load(moe)  # the stored per-layer widths
    assert new_gate.top_m == report.top_m and all(2 <= m <= 8 for m in report.top_m)
    new = token_recall(new_gate.scores(rec.x0), rec.routes, 2)
    assert sum(new) >= sum(old), (old, new)
    assert all(r >= 0.9 - 1e-9 or m == 8 for r, m in zip(report.recall, report.top_m))
    assert json.loads((moe / "pregate.json").read_text())["report"]["top_m"] == report.top_m
    # the default moefy fits on the model's own routing and stores calibrated widths
    moe2 = _moefy(dense, tmp_path / "moe2", 8, 2, 0.25)
    report2 = json.loads((moe2 / "moefy.json").read_text())["report"]
    assert report2["pregate_from"] == "moe" and PreGate.load(moe2).top_m == report2["pregate_top_m"]


def test_mlp_pregate_round_trips(dense: Path, tmp_path: Path) -> None:
    from mixserve.experts.pregate_fit import fit_mlp

    moe = _moefy(dense, tmp_path / "moe", 8, 2, 0.25)
    rec = _own_routing(moe, dense.parent / "calib.txt")
    gate = fit_mlp(rec, 8, [2, 3], hidden=32, steps=20)
    gate.save(tmp_path)
    back = PreGate.load(tmp_path)
    assert back.kind == "mlp" and back.top_m == [2, 3]
    torch.testing.assert_close(back.scores(rec.x0[:5]), gate.scores(rec.x0[:5]))
    assert [len(v) for v in back.predict_step(rec.x0[:1]).values()] == [2, 3]
    from mixserve.cli import main

    assert main(["refit-pregate", str(moe), "--kind", "mlp", "--calibration", str(dense.parent / "calib.txt"),
                 "--calibration-tokens", "256", "--threads", "1"]) == 0
    assert PreGate.load(moe).kind == "mlp" and len(PreGate.load(moe).top_m) == 2


def test_refit_bad_arguments(dense: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from mixserve.cli import main
    from mixserve.experts.pregate_fit import RefitConfig, calibrate_top_m

    with pytest.raises(ValueError, match="--kind='cubic'"):
        RefitConfig("m", kind="cubic")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="--target-recall=1.5"):
        RefitConfig("m", target_recall=1.5)
    with pytest.raises(ValueError, match="--pregate-from='both'"):
        MoefyConfig(str(dense), str(tmp_path / "o"), 4, 2, pregate_from="both")
    with pytest.raises(ValueError, match=r"top_m=\[2, 9\] must be in \[1, num_experts=8\]"):
        PreGate(torch.zeros(2, 8, 4), [0, 1], [2, 9])
    with pytest.raises(FileNotFoundError, match="no pre-gating router"):
        PreGate.load(tmp_path)
    assert main(["refit-pregate", str(dense)]) == 2
    assert "not an MoE model" in capsys.readouterr().err
    # calibrate_top_m: smallest m reaching the target, per layer
    scores = torch.tensor([[[4.0, 3.0, 2.0, 1.0]] * 2])  # 1 layer, 2 tokens
    routes = [torch.tensor([[0], [2]])]
    assert calibrate_top_m(scores, routes, 0.5) == [1] and calibrate_top_m(scores, routes, 1.0) == [3]
