"""Pack -> load round trip; corrupt, truncated and inconsistent packs fail with the file and field named."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mixserve.cli import main
from mixserve.experts.pack import dtype_plan, write_pack
from mixserve.experts.quant import blob_layout, decode, encode
from mixserve.experts.store import BLOB_FILE, MANIFEST, ExpertStore, PackError
from tests.experts.conftest import Tiny


def test_roundtrip_is_exact(olmoe: Tiny, olmoe_pack: Path) -> None:
    weights = load_file(olmoe.path / "model.safetensors")
    store = ExpertStore(olmoe_pack)
    assert store.layer_ids == [0, 1, 2] and store.num_experts == 8 and store.architecture == "OlmoeForCausalLM"
    for layer_idx in store.layer_ids:
        for e in (0, 5):
            prefix = f"model.layers.{layer_idx}.mlp.experts.{e}."
            gate_up, down = store.dequantized(layer_idx, e, torch.float32)
            want = torch.cat([weights[prefix + "gate_proj.weight"], weights[prefix + "up_proj.weight"]])
            assert torch.equal(gate_up, want) and torch.equal(down, weights[prefix + "down_proj.weight"])
    store.verify()
    dense = load_file(olmoe_pack / "model.safetensors")
    assert not any(".experts." in k for k in dense) and "model.embed_tokens.weight" in dense
    assert (olmoe_pack / "tokenizer.json").is_file() and (olmoe_pack / "config.json").is_file()


def test_expert_wise_dtypes(olmoe: Tiny, olmoe_mixed_pack: Path) -> None:
    store = ExpertStore(olmoe_mixed_pack)
    assert store.entry(0, 0).dtype == "int4" and store.entry(1, 5).dtype == "int8"
    assert store.entry(2, 3).dtype == "bfloat16" and store.entry(2, 4).dtype == "int4"
    weights = load_file(olmoe.path / "model.safetensors")
    p = "model.layers.0.mlp.experts.0."
    gate_up = torch.cat([weights[p + "gate_proj.weight"], weights[p + "up_proj.weight"]])
    raw = torch.frombuffer(bytearray(encode("int4", gate_up, weights[p + "down_proj.weight"])), dtype=torch.uint8)
    want = decode(raw, blob_layout("int4", 64, 32), torch.float32)
    got = store.dequantized(0, 0, torch.float32)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert store.total_nbytes() < store.entry(2, 3).nbytes * 24 / 2  # vs all bfloat16
    with pytest.raises(ValueError, match="3.1=.*fp8"):
        dtype_plan("auto", {"3.1": "fp8"})


def copy_pack(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_corrupt_byte_fails_checksum(olmoe_pack: Path, tmp_path: Path) -> None:
    pack = copy_pack(olmoe_pack, tmp_path / "p")
    store = ExpertStore(pack)
    entry = store.entry(1, 6)
    with (pack / BLOB_FILE).open("r+b") as f:
        f.seek(entry.offset + 100)
        byte = f.read(1)
        f.seek(entry.offset + 100)
        f.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(PackError, match=r"experts\.bin: layer 1 expert 6 fails its checksum"):
        ExpertStore(pack).read(1, 6)
    with pytest.raises(PackError, match="layer 1 expert 6"):
        ExpertStore(pack).verify()
    ExpertStore(pack).read(1, 5)  # the others are fine
    unchecked = ExpertStore(pack, verify_checksums=False)
    unchecked.read(1, 6)


def test_truncated_blob_file_fails_at_open(olmoe_pack: Path, tmp_path: Path) -> None:
    pack = copy_pack(olmoe_pack, tmp_path / "p")
    size = (pack / BLOB_FILE).stat().st_size
    with (pack / BLOB_FILE).open("r+b") as f:
        f.truncate(size - 5000)
    with pytest.raises(PackError, match=r"experts\.bin: truncated: layer \d+ expert \d+ ends at byte"):
        ExpertStore(pack)
    (pack / BLOB_FILE).unlink()
    with pytest.raises(PackError, match=r"experts\.bin: missing"):
        ExpertStore(pack)


@pytest.mark.parametrize("edit,match", [
    (lambda m: m.pop("hidden_size"), "field 'hidden_size' is missing"),
    (lambda m: m.update(version=99), "field 'version' is 99"),
    (lambda m: m.update(format="zip"), "field 'format'"),
    (lambda m: m["experts"][3].pop("crc32"), "field 'crc32' is missing"),
    (lambda m: m["experts"][3].update(dtype="fp8"), r"experts\[3\] field 'dtype' is 'fp8'"),
    (lambda m: m["experts"][3].update(nbytes=7), r"experts\[3\] .* nbytes=7"),
    (lambda m: m["experts"].pop(), "no entry for 1 expert"),
])
def test_bad_manifest_names_field(olmoe_pack: Path, tmp_path: Path, edit: object, match: str) -> None:
    pack = copy_pack(olmoe_pack, tmp_path / "p")
    manifest = json.loads((pack / MANIFEST).read_text())
    edit(manifest)  # type: ignore[operator]
    (pack / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(PackError, match=match):
        ExpertStore(pack)


def test_missing_or_garbled_manifest(olmoe_pack: Path, tmp_path: Path) -> None:
    pack = copy_pack(olmoe_pack, tmp_path / "p")
    (pack / MANIFEST).write_text("{not json")
    with pytest.raises(PackError, match=r"experts\.json: not valid JSON"):
        ExpertStore(pack)
    (pack / MANIFEST).unlink()
    with pytest.raises(PackError, match=r"experts\.json: missing"):
        ExpertStore(pack)


def test_pack_refuses_dense_and_existing(olmoe: Tiny, olmoe_pack: Path, tmp_path: Path) -> None:
    with pytest.raises(PackError, match="already exists"):
        write_pack(olmoe.path, olmoe_pack, progress=False)
    dense = copy_pack(olmoe.path, tmp_path / "dense")
    cfg = json.loads((dense / "config.json").read_text())
    del cfg["num_experts"]
    (dense / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(PackError, match="not an MoE model"):
        write_pack(dense, tmp_path / "out", progress=False)


def test_cli_pack(olmoe: Tiny, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"0": "int8"}))
    assert main(["pack", str(olmoe.path), str(tmp_path / "p"), "--expert-dtype", "bfloat16",
                 "--dtype-plan", str(plan), "--verify"]) == 0
    assert "packed 24 experts of 3 layers" in capsys.readouterr().err
    store = ExpertStore(tmp_path / "p")
    assert store.entry(0, 1).dtype == "int8" and store.entry(1, 1).dtype == "bfloat16"
    assert main(["pack", str(olmoe.path), str(tmp_path / "p")]) == 2
    assert "already exists" in capsys.readouterr().err
