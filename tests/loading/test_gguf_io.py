"""The GGUF reader (vs gguf.GGUFReader) and every way a GGUF input can be bad."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from mixserve.loading.checkpoint import CheckpointError, load_checkpoint
from mixserve.loading.gguf_io import GGUFFile
from tests.loading.gguf_fixtures import byte_level_tokens


def write_gguf(path: Path, arch: str = "llama", tensors: dict[str, np.ndarray] | None = None,
               raw: dict[str, tuple[np.ndarray, gguf.GGMLQuantizationType]] | None = None,
               meta: dict[str, int] | None = None, tokenizer: bool = True) -> Path:
    writer = gguf.GGUFWriter(str(path), arch)
    for key, value in (meta or {}).items():
        writer.add_uint32(f"{arch}.{key}", value)
    writer.add_float32(f"{arch}.some_float", 0.5)
    writer.add_array(f"{arch}.int_array", [1, 2, 3])
    writer.add_array(f"{arch}.str_array", ["a", "bé", "😀"])
    writer.add_bool(f"{arch}.flag", True)
    if tokenizer:
        writer.add_tokenizer_model("gpt2")
        writer.add_token_list(byte_level_tokens(300))
    for name, arr in (tensors or {}).items():
        writer.add_tensor(name, arr)
    for name, (arr, qtype) in (raw or {}).items():
        writer.add_tensor(name, arr, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


TINY_META = {"block_count": 1, "embedding_length": 32, "attention.head_count": 2, "context_length": 64,
             "feed_forward_length": 64}


def tiny_llama_tensors() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    shapes = {"token_embd.weight": (300, 32), "output_norm.weight": (32,), "blk.0.attn_norm.weight": (32,),
              "blk.0.attn_q.weight": (32, 32), "blk.0.attn_k.weight": (32, 32),
              "blk.0.attn_v.weight": (32, 32),
              "blk.0.attn_output.weight": (32, 32), "blk.0.ffn_norm.weight": (32,),
              "blk.0.ffn_gate.weight": (64, 32), "blk.0.ffn_up.weight": (64, 32),
              "blk.0.ffn_down.weight": (32, 64)}
    return {n: rng.standard_normal(s).astype(np.float32) for n, s in shapes.items()}


def assert_same_as_gguf_reader(path: Path) -> None:
    ours, ref = GGUFFile(path), gguf.GGUFReader(str(path))
    ref_fields = {k: f for k, f in ref.fields.items() if not k.startswith("GGUF.")}
    assert set(ours.metadata) == set(ref_fields)
    for key, field in ref_fields.items():
        value, expected = ours.metadata[key], field.contents()
        if isinstance(value, np.ndarray):
            np.testing.assert_array_equal(value, np.asarray(expected), err_msg=key)
        elif isinstance(value, float):
            assert value == pytest.approx(expected), key
        else:
            assert value == expected, key
    assert list(ours.tensors) == [t.name for t in ref.tensors]
    for t in ref.tensors:
        info = ours.tensors[t.name]
        assert info.ggml_type == t.tensor_type and info.n_bytes == t.n_bytes
        assert info.shape == tuple(int(d) for d in reversed(t.shape.tolist()))
        expected = np.asarray(t.data).view(np.uint8).reshape(-1)
        np.testing.assert_array_equal(ours.raw(t.name).reshape(-1), expected)


def test_reader_matches_gguf_reader_tiny(tmp_path: Path) -> None:
    assert_same_as_gguf_reader(write_gguf(tmp_path / "t.gguf", tensors=tiny_llama_tensors(), meta=TINY_META))


def test_reader_matches_gguf_reader_smollm2(smollm2_gguf: Path) -> None:
    assert_same_as_gguf_reader(smollm2_gguf)


def test_dequantize_shape_and_values(tmp_path: Path) -> None:
    tensors = tiny_llama_tensors()
    g = GGUFFile(write_gguf(tmp_path / "t.gguf", tensors=tensors, meta=TINY_META))
    for name, arr in tensors.items():
        assert torch.equal(g.dequantize(name), torch.from_numpy(arr)), name


# --- errors -------------------------------------------------------------------------------------

def test_missing_path(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="no such file"):
        load_checkpoint(tmp_path / "nope.gguf")


def test_empty_file(tmp_path: Path) -> None:
    (tmp_path / "e.gguf").write_bytes(b"")
    with pytest.raises(CheckpointError, match="e.gguf"):
        GGUFFile(tmp_path / "e.gguf")


def test_not_a_gguf(tmp_path: Path) -> None:
    (tmp_path / "x.gguf").write_bytes(b"hello, not a model" * 10)
    with pytest.raises(CheckpointError, match="not a GGUF"):
        GGUFFile(tmp_path / "x.gguf")
    with pytest.raises(CheckpointError, match="neither a GGUF"):
        load_checkpoint(tmp_path / "x.gguf")


def test_unsupported_version(tmp_path: Path) -> None:
    (tmp_path / "v.gguf").write_bytes(b"GGUF" + (1).to_bytes(4, "little") + bytes(16))
    with pytest.raises(CheckpointError, match="version 1"):
        GGUFFile(tmp_path / "v.gguf")


@pytest.mark.parametrize("keep", [10, 30, 2000, 20_000])
def test_truncated_header_real_file(smollm2_gguf: Path, tmp_path: Path, keep: int) -> None:
    cut = tmp_path / "cut.gguf"
    with smollm2_gguf.open("rb") as f:
        cut.write_bytes(f.read(keep))
    with pytest.raises(CheckpointError, match="cut.gguf.*(truncated|corrupt)"):
        load_checkpoint(cut)


def test_truncated_data_real_file(smollm2_gguf: Path, tmp_path: Path) -> None:
    cut = tmp_path / "cut.gguf"
    with smollm2_gguf.open("rb") as src, cut.open("wb") as dst:
        dst.write(src.read(smollm2_gguf.stat().st_size - 4096))
    with pytest.raises(CheckpointError, match="cut.gguf: truncated GGUF: tensor"):
        load_checkpoint(cut)


def test_corrupt_counts(tmp_path: Path) -> None:
    path = write_gguf(tmp_path / "t.gguf", tensors=tiny_llama_tensors(), meta=TINY_META)
    data = bytearray(path.read_bytes())
    data[16:24] = (2**62).to_bytes(8, "little")  # kv count
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="corrupt"):
        GGUFFile(path)


def test_unknown_architecture(tmp_path: Path) -> None:
    path = write_gguf(tmp_path / "m.gguf", arch="mamba", tensors={"token_embd.weight": np.zeros((300, 32),
                                                                                            np.float32)})
    with pytest.raises(CheckpointError, match="m.gguf: GGUF architecture 'mamba' is not supported"):
        load_checkpoint(path)


def test_unsupported_quant_type(tmp_path: Path) -> None:
    tensors = tiny_llama_tensors()
    raw = {"blk.0.ffn_up.weight": (np.zeros((64, 18), np.uint8), gguf.GGMLQuantizationType.IQ4_NL)}
    del tensors["blk.0.ffn_up.weight"]
    path = write_gguf(tmp_path / "q.gguf", tensors=tensors, raw=raw, meta=TINY_META)
    with pytest.raises(CheckpointError, match=r"q.gguf: unsupported GGUF tensor type.*IQ4_NL.*ffn_up"):
        load_checkpoint(path)


def test_unknown_tensor_name(tmp_path: Path) -> None:
    tensors = {**tiny_llama_tensors(), "blk.0.mystery.weight": np.zeros(32, np.float32)}
    path = write_gguf(tmp_path / "u.gguf", tensors=tensors, meta=TINY_META)
    with pytest.raises(CheckpointError, match="u.gguf: GGUF tensors with no HF equivalent.*mystery"):
        load_checkpoint(path)


def test_missing_required_metadata(tmp_path: Path) -> None:
    meta = {k: v for k, v in TINY_META.items() if k != "embedding_length"}
    path = write_gguf(tmp_path / "n.gguf", tensors=tiny_llama_tensors(), meta=meta)
    with pytest.raises(CheckpointError, match="n.gguf: GGUF metadata lacks required key 'llama.embedding"):
        load_checkpoint(path)


def test_missing_tokenizer_metadata(tmp_path: Path) -> None:
    path = write_gguf(tmp_path / "nt.gguf", tensors=tiny_llama_tensors(), meta=TINY_META, tokenizer=False)
    with pytest.raises(CheckpointError, match="nt.gguf: GGUF has no tokenizer metadata"):
        load_checkpoint(path)


def test_folder_with_one_gguf_loads_it(tmp_path: Path) -> None:
    write_gguf(tmp_path / "only.gguf", tensors=tiny_llama_tensors(), meta=TINY_META)
    ck = load_checkpoint(tmp_path)
    assert ck.path == tmp_path / "only.gguf" and ck.format == "gguf"
    write_gguf(tmp_path / "second.gguf", tensors=tiny_llama_tensors(), meta=TINY_META)
    with pytest.raises(CheckpointError, match="several GGUF files"):
        load_checkpoint(tmp_path)
