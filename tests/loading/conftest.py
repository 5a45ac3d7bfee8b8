"""References from transformers (a test-only dependency) for the embedded GGUF models.

transformers parses GGUF metadata with gguf.GGUFReader, which is slow on big vocabularies: the
SmolLM2 references take ~10-30 s, gemma3's ~1-2 min, so each is built once per session and the
tests that need them are marked slow.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch


def hf_tokenizer(gguf_path: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)


def hf_config_and_tensors(gguf_path: Path) -> tuple[Any, dict[str, torch.Tensor]]:
    """transformers' config and dequantized, renamed tensors (`from_pretrained`'s own GGUF path,
    called directly because `from_pretrained(gguf_file=...)` also wants accelerate)."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    config = AutoConfig.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    parsed = load_gguf_checkpoint(str(gguf_path), return_tensors=True, model_to_load=model)
    return config, parsed["tensors"]


@pytest.fixture(scope="session")
def smollm2_hf_tokenizer(smollm2_gguf: Path) -> Any:
    return hf_tokenizer(smollm2_gguf)


@pytest.fixture(scope="session")
def gemma3_hf_tokenizer(gemma3_gguf: Path) -> Any:
    return hf_tokenizer(gemma3_gguf)


@pytest.fixture(scope="session")
def smollm2_hf_reference(smollm2_gguf: Path) -> tuple[Any, dict[str, torch.Tensor]]:
    return hf_config_and_tensors(smollm2_gguf)


@pytest.fixture(scope="session")
def gemma3_hf_reference(gemma3_gguf: Path) -> tuple[Any, dict[str, torch.Tensor]]:
    return hf_config_and_tensors(gemma3_gguf)
