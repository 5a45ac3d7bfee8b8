"""Shared fixtures: the embedded real models, pulled once through `mixserve.hub` into the persistent
default cache (`~/.cache/mixserve/models`), so only the first run on a machine downloads them."""

from __future__ import annotations

from pathlib import Path

import pytest

from mixserve import hub
from mixserve.loading.checkpoint import Checkpoint, load_checkpoint


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """SmolLM2-135M-Instruct Q4_1 GGUF (llama architecture, byte-level BPE, chat template)."""
    return hub.pull("smollm2-135m", progress=False)


@pytest.fixture(scope="session")
def gemma3_gguf() -> Path:
    """gemma-3-270m Q4_K_M GGUF (gemma3 architecture, SentencePiece BPE, no chat template)."""
    return hub.pull("gemma3-270m", progress=False)


@pytest.fixture(scope="session")
def smollm2_path(smollm2_gguf: Path) -> str:
    return str(smollm2_gguf)


@pytest.fixture(scope="session")
def gemma3_path(gemma3_gguf: Path) -> str:
    return str(gemma3_gguf)


@pytest.fixture(scope="session")
def smollm2_checkpoint(smollm2_gguf: Path) -> Checkpoint:
    return load_checkpoint(smollm2_gguf)


@pytest.fixture(scope="session")
def gemma3_checkpoint(gemma3_gguf: Path) -> Checkpoint:
    """Loaded once per session: building gemma3's 262k-token tokenizer takes a few seconds."""
    return load_checkpoint(gemma3_gguf)
