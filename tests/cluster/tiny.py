"""A tiny random llama folder (HF safetensors + a word-level tokenizer) that every engine here loads fast."""

from __future__ import annotations

import json
from pathlib import Path

import tokenizers
import torch
import transformers

VOCAB_SIZE = 256
PROMPTS = ["t5 t17 t99 t3 t250 t42 t42 t7", "t9 t8 t7 t6 t5 t4 t3", "t100 t101 t102 t103 t104 t105 t106 t107 t108"]


def write_tiny_llama(path: Path, num_layers: int = 2, seed: int = 0) -> Path:
    """Write the model (seeded, so every process gets the same weights) and its tokenizer into `path`."""
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=VOCAB_SIZE, hidden_size=64, intermediate_size=128,
                                   num_hidden_layers=num_layers, num_attention_heads=4, num_key_value_heads=2,
                                   initializer_range=0.15, tie_word_embeddings=False,
                                   max_position_embeddings=512)
    transformers.AutoModelForCausalLM.from_config(cfg).save_pretrained(path)
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel({f"t{i}": i for i in range(VOCAB_SIZE)}, unk_token="t1"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tok.decoder = tokenizers.decoders.WordPiece(prefix="##")
    tok.save(str(path / "tokenizer.json"))
    template = "{% for m in messages %}{{ m['content'] }} {% endfor %}"
    (path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "t2", "unk_token": "t1",
                                                             "chat_template": template}))
    return path
