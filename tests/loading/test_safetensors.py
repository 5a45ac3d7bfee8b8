"""HF folders: safetensors (single and sharded) round trip, tokenizer files, and every bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer as Backend
from tokenizers import decoders, pre_tokenizers
from tokenizers.models import BPE

from mixserve.loading.checkpoint import CheckpointError, load_checkpoint, open_weights
from tests.loading.gguf_fixtures import byte_level_tokens

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def write_tokenizer(folder: Path, generation_eos: list[int] | None = None) -> None:
    """A byte-level tokenizer.json (vocab 300: 256 bytes, 3 specials, fillers) and its configs."""
    tokens = byte_level_tokens(300)
    backend = Backend(BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    backend.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<|im_start|>", "eos_token": {"content": "<|endoftext|>"}, "chat_template": CHATML,
         "add_bos_token": True}))
    if generation_eos is not None:
        (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": generation_eos}))


def tiny_llama(folder: Path, dtype: torch.dtype = torch.float32, **save_kw) -> dict[str, torch.Tensor]:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg).to(dtype)  # type: ignore[arg-type]
    model.save_pretrained(folder, **save_kw)
    return {k: v.detach() for k, v in model.state_dict().items()}


@pytest.fixture
def hf_folder(tmp_path: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    folder = tmp_path / "tiny"
    state = tiny_llama(folder)
    write_tokenizer(folder, generation_eos=[256, 258])
    return folder, state


def assert_weights_equal(folder: Path, state: dict[str, torch.Tensor]) -> None:
    ck = load_checkpoint(folder)
    got = dict(ck.weights())
    assert sorted(got) == sorted(state)
    for name, w in state.items():
        assert got[name].dtype == w.dtype and torch.equal(got[name], w), name


def test_single_file_round_trip(hf_folder) -> None:
    folder, state = hf_folder
    assert_weights_equal(folder, state)
    ck = load_checkpoint(folder)
    assert ck.format == "hf" and ck.architecture == "LlamaForCausalLM"
    assert ck.hf_config["hidden_size"] == 32 and ck.quantization.tensor_types == {"F32": len(state)}
    assert ck.eos_token_ids == (256, 258)  # generation_config first; <|im_end|> is already there
    assert ck.tokenizer.bos_token_id == 257 and ck.tokenizer.encode("a")[0] == 257  # add_bos_token
    assert ck.tokenizer.apply_chat_template([{"role": "user", "content": "x"}]) == \
        "<|im_start|>user\nx<|im_end|>\n<|im_start|>assistant\n"


def test_sharded_round_trip_bf16(tmp_path: Path) -> None:
    folder = tmp_path / "sharded"
    state = tiny_llama(folder, torch.bfloat16, max_shard_size="20KB")
    write_tokenizer(folder)
    assert (folder / "model.safetensors.index.json").is_file()
    assert len(list(folder.glob("*.safetensors"))) > 2
    assert_weights_equal(folder, state)
    ck = load_checkpoint(folder)
    assert ck.quantization.file_type == "BF16"
    # generation_config.json (written by save_pretrained) first, then tokenizer_config's eos_token
    assert ck.eos_token_ids == (2, 256, 258)  # + <|im_end|>, which the chat template writes
    names = ["model.layers.1.mlp.down_proj.weight", "model.embed_tokens.weight"]
    got = dict(ck.weights(names, dtype=torch.float32))
    assert sorted(got) == sorted(names) and all(t.dtype == torch.float32 for t in got.values())


def test_open_weights_needs_no_tokenizer(tmp_path: Path) -> None:
    folder = tmp_path / "notok"
    state = tiny_llama(folder)
    config, source = open_weights(folder)
    assert config["num_hidden_layers"] == 2 and sorted(source.names) == sorted(state)
    with pytest.raises(CheckpointError, match="notok: no tokenizer.json"):
        load_checkpoint(folder)
    tok_dir = tmp_path / "tok"
    tok_dir.mkdir()
    write_tokenizer(tok_dir)
    assert load_checkpoint(folder, tokenizer_path=tok_dir).tokenizer.vocab_size == 300


def test_tokenizer_from_gguf_for_hf_folder(tmp_path: Path, smollm2_gguf: Path) -> None:
    folder = tmp_path / "m"
    tiny_llama(folder)
    assert load_checkpoint(folder, tokenizer_path=smollm2_gguf).tokenizer.vocab_size == 49152


# --- errors -------------------------------------------------------------------------------------

def test_folder_without_config(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="folder has no config.json"):
        load_checkpoint(tmp_path)


def test_config_without_safetensors(hf_folder) -> None:
    folder, _ = hf_folder
    (folder / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no \\*.safetensors weights"):
        load_checkpoint(folder)


def test_invalid_config_json(hf_folder) -> None:
    folder, _ = hf_folder
    (folder / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="config.json: not valid JSON"):
        load_checkpoint(folder)


def test_quantized_hf_checkpoint_rejected(hf_folder) -> None:
    folder, _ = hf_folder
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "gptq"}
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"quantized HF checkpoints \(gptq\)"):
        load_checkpoint(folder)


@pytest.mark.parametrize("cut", [4, 100, -10])
def test_truncated_safetensors(hf_folder, cut: int) -> None:
    folder, _ = hf_folder
    f = folder / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[:cut] if cut > 0 else data[:cut])
    with pytest.raises(CheckpointError, match="model.safetensors: (truncated|corrupt)"):
        load_checkpoint(folder)


def test_corrupt_safetensors_header(hf_folder) -> None:
    folder, _ = hf_folder
    f = folder / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[8:16] = b"garbage!"
    f.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="model.safetensors: corrupt safetensors header"):
        load_checkpoint(folder)


def test_index_with_missing_shard(tmp_path: Path) -> None:
    folder = tmp_path / "sharded"
    tiny_llama(folder, max_shard_size="20KB")
    write_tokenizer(folder)
    shard = sorted(folder.glob("model-*.safetensors"))[0]
    shard.unlink()
    with pytest.raises(CheckpointError, match=f"shard '{shard.name}' is missing"):
        load_checkpoint(folder)


def test_lone_safetensors_file(hf_folder) -> None:
    folder, _ = hf_folder
    with pytest.raises(CheckpointError, match="lone .safetensors file has no config"):
        load_checkpoint(folder / "model.safetensors")


def test_bad_tokenizer_json(hf_folder) -> None:
    folder, _ = hf_folder
    (folder / "tokenizer.json").write_text("{}")
    with pytest.raises(CheckpointError, match="tokenizer.json: cannot parse tokenizer"):
        load_checkpoint(folder)


def test_missing_tokenizer_path(hf_folder, tmp_path: Path) -> None:
    folder, _ = hf_folder
    with pytest.raises(CheckpointError, match="tokenizer path does not exist"):
        load_checkpoint(folder, tokenizer_path=tmp_path / "nope")


def test_copy_of_folder_still_loads(hf_folder, tmp_path: Path) -> None:
    folder, state = hf_folder
    copy = tmp_path / "copy"
    shutil.copytree(folder, copy)
    assert_weights_equal(copy, state)
