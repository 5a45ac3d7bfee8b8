"""Tokenizers rebuilt from GGUF metadata and read from HF folders, against transformers."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pytest

from mixserve.loading.checkpoint import Checkpoint
from mixserve.loading.tokenizer import Tokenizer, load_hf_tokenizer, load_tokenizer
from tests.loading.texts import TEXTS


def assert_parity(ours: Tokenizer, ref: Any, texts: list[str] = TEXTS) -> None:
    for text in texts:
        for special in (True, False):
            expected = ref(text, add_special_tokens=special)["input_ids"]
            assert ours.encode(text, add_special_tokens=special) == expected, (text, special)
        ids = ref(text, add_special_tokens=True)["input_ids"]
        for skip in (True, False):
            expected = ref.decode(ids, skip_special_tokens=skip)
            assert ours.decode(ids, skip_special_tokens=skip) == expected, text
    rng = random.Random(0)
    for _ in range(30):  # arbitrary id sequences decode the same too (byte pieces, specials, ...)
        ids = [rng.randrange(ours.vocab_size) for _ in range(rng.randint(1, 20))]
        for skip in (True, False):
            expected = ref.decode(ids, skip_special_tokens=skip)
            assert ours.decode(ids, skip_special_tokens=skip) == expected, ids
    assert ours.vocab_size == len(ref)
    assert ours.convert_ids_to_tokens([0, 1, 2, 100]) == ref.convert_ids_to_tokens([0, 1, 2, 100])


def assert_round_trip(tok: Tokenizer, texts: list[str] = TEXTS) -> None:
    for text in texts:
        assert tok.decode(tok.encode(text, add_special_tokens=False), skip_special_tokens=False) == text


def test_smollm2_gguf_tokenizer_matches_transformers(smollm2_checkpoint: Checkpoint,
                                                    smollm2_hf_tokenizer: Any) -> None:
    tok = smollm2_checkpoint.tokenizer
    assert_parity(tok, smollm2_hf_tokenizer)
    assert_round_trip(tok)
    assert tok.bos_token_id == smollm2_hf_tokenizer.bos_token_id == 1
    assert tok.eos_token_ids == [2]  # <|im_end|> is both EOS and the end-of-turn marker
    assert set(smollm2_hf_tokenizer.all_special_ids) <= set(tok.all_special_ids)


@pytest.mark.slow  # transformers builds gemma3's 262k-token tokenizer in ~1-2 min
def test_gemma3_gguf_tokenizer_matches_transformers(gemma3_checkpoint: Checkpoint,
                                                   gemma3_hf_tokenizer: Any) -> None:
    tok = gemma3_checkpoint.tokenizer
    assert_parity(tok, gemma3_hf_tokenizer)
    assert tok.bos_token_id == 2 and tok.eos_token_ids[0] == 1
    assert set(gemma3_hf_tokenizer.all_special_ids) <= set(tok.all_special_ids)


def test_gemma3_round_trip_and_specials(gemma3_checkpoint: Checkpoint) -> None:
    tok = gemma3_checkpoint.tokenizer
    assert_round_trip(tok)
    assert tok.encode("hi")[0] == 2  # add_bos_token
    assert tok.encode("hi", add_special_tokens=False)[0] != 2
    assert tok.encode("<start_of_turn>user\n", add_special_tokens=False)[0] == 105
    assert tok.vocab_size == 262144
    assert tok.chat_template_is_default  # this base model's file carries no template


def test_hf_folder_tokenizer_matches_transformers(smollm2_hf_tokenizer, smollm2_checkpoint: Checkpoint,
                                                  tmp_path: Path) -> None:
    """The tokenizer.json transformers writes for the GGUF tokenizer, read back by both sides."""
    from transformers import AutoTokenizer

    smollm2_hf_tokenizer.save_pretrained(tmp_path)
    ref = AutoTokenizer.from_pretrained(str(tmp_path))
    ours = load_hf_tokenizer(tmp_path)
    assert_parity(ours, ref)
    assert ours.eos_token_ids == [2] and ours.bos_token_id == 1
    assert ours.chat_template == smollm2_checkpoint.tokenizer.chat_template
    assert load_tokenizer(tmp_path).encode("x y") == ours.encode("x y")


@pytest.mark.slow
def test_gemma3_hf_folder_tokenizer(gemma3_hf_tokenizer: Any, gemma3_checkpoint: Checkpoint,
                                    tmp_path: Path) -> None:
    gemma3_hf_tokenizer.save_pretrained(tmp_path)
    ours = load_hf_tokenizer(tmp_path)
    for text in TEXTS:
        assert ours.encode(text) == gemma3_checkpoint.tokenizer.encode(text), text


def test_smollm2_chat_template_matches_transformers(smollm2_checkpoint: Checkpoint,
                                                   smollm2_hf_tokenizer: Any) -> None:
    tok = smollm2_checkpoint.tokenizer
    conversations = [
        [{"role": "user", "content": "Hi there!"}],
        [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "2+2?"},
         {"role": "assistant", "content": "4"}, {"role": "user", "content": "And 3+3? 日本 😀"}],
    ]
    for messages in conversations:
        for gen in (True, False):
            expected = smollm2_hf_tokenizer.apply_chat_template(messages, tokenize=False,
                                                                add_generation_prompt=gen)
            assert tok.apply_chat_template(messages, add_generation_prompt=gen) == expected
    ids = tok.encode_chat(conversations[0])
    assert ids[0] == 1  # <|im_start|>, written by the template (encode_chat adds no specials)
    assert tok.decode(ids, skip_special_tokens=False).endswith("<|im_start|>assistant\n")


def test_default_template_for_base_model(gemma3_checkpoint: Checkpoint) -> None:
    tok = gemma3_checkpoint.tokenizer
    text = tok.apply_chat_template([{"role": "system", "content": "S"}, {"role": "user", "content": "Q"},
                                    {"role": "assistant", "content": "A"}, {"role": "user", "content": "Q2"}])
    assert text == "<bos>S\n\nUser: Q\nAssistant: A\nUser: Q2\nAssistant:"
    ids = tok.encode_chat([{"role": "user", "content": "Q"}])
    assert ids.count(2) == 1 and ids[0] == 2  # BOS exactly once


def test_tokenizer_special_strings(smollm2_checkpoint: Checkpoint) -> None:
    specials = smollm2_checkpoint.tokenizer.special_tokens()
    assert specials["bos_token"] == "<|im_start|>" and specials["eos_token"] == "<|im_end|>"
    assert specials["unk_token"] == "<|endoftext|>"
