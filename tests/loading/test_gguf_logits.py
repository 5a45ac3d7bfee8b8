"""Logits of the embedded GGUF models: ours vs transformers loading the same GGUF (fp32, dense)."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from mixserve.loading.checkpoint import Checkpoint
from mixserve.models.base import build_model
from tests.harness import greedy, prefill_logits

pytestmark = pytest.mark.slow

PROMPTS = [
    "The capital of France is",
    "def add(a, b):\n    return",
    "Über den Wolken muss die Freiheit wohl grenzenlos sein. 東京は",
]


def hf_model(reference: tuple[Any, dict[str, torch.Tensor]]) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    config, tensors = reference
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    assert not unexpected and all("lm_head" in k for k in missing), (missing, unexpected)
    model.tie_weights()
    return model.eval()


def ours(checkpoint: Checkpoint) -> torch.nn.Module:
    model = build_model(checkpoint.hf_config, torch.float32)
    model.load_weights(checkpoint.weights())
    return model.eval()


def compare(checkpoint: Checkpoint, reference: tuple[Any, dict[str, torch.Tensor]]) -> None:
    mine, theirs = ours(checkpoint), hf_model(reference)
    for prompt in PROMPTS:
        ids = checkpoint.tokenizer.encode(prompt)
        with torch.no_grad():
            want = theirs(torch.tensor([ids])).logits[0].float()
        got = prefill_logits(mine, ids)
        torch.testing.assert_close(got, want, atol=2e-3, rtol=1e-3)
        assert torch.equal(got.argmax(-1), want.argmax(-1))
        with torch.no_grad():
            ref = theirs.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False)[0, len(ids):]
        assert greedy(mine, ids, 8) == ref.tolist()


def test_smollm2_logits_match_transformers(smollm2_checkpoint, smollm2_hf_reference) -> None:
    compare(smollm2_checkpoint, smollm2_hf_reference)


def test_gemma3_logits_match_transformers(gemma3_checkpoint, gemma3_hf_reference) -> None:
    compare(gemma3_checkpoint, gemma3_hf_reference)
