"""IncrementalDetokenizer: streamed text equals one-shot decode, and never half a character."""

from __future__ import annotations

import random

import pytest

from mixserve.loading.checkpoint import Checkpoint
from mixserve.loading.tokenizer import IncrementalDetokenizer, Tokenizer
from tests.loading.texts import TEXTS


def stream(tok: Tokenizer, ids: list[int], prompt: list[int] | None = None, skip: bool = True) -> list[str]:
    detok = IncrementalDetokenizer(tok, prompt_ids=prompt or [], skip_special_tokens=skip)
    pieces = [detok.push(i) for i in ids]
    pieces.append(detok.flush())
    assert detok.text == "".join(pieces) and detok.output_ids == ids
    return pieces


@pytest.fixture(params=["smollm2", "gemma3"])
def tok(request: pytest.FixtureRequest) -> Tokenizer:
    checkpoint: Checkpoint = request.getfixturevalue(f"{request.param}_checkpoint")
    return checkpoint.tokenizer


def test_stream_equals_decode(tok: Tokenizer) -> None:
    for text in TEXTS:
        ids = tok.encode(text, add_special_tokens=False)
        for skip in (True, False):
            pieces = stream(tok, ids, skip=skip)
            assert "".join(pieces) == tok.decode(ids, skip_special_tokens=skip), text
            assert not any("\ufffd" in p for p in pieces), text  # valid text never streams U+FFFD


def test_stream_after_prompt(tok: Tokenizer) -> None:
    for prompt_text, text in [("Question: what is 2+2?", " The answer is 4."), ("日本", "語のテキスト 😀"),
                              ("x", "   spaced   out  "), ("def f():", "\n    return 1\n")]:
        prompt = tok.encode(prompt_text)
        ids = tok.encode(prompt_text + text, add_special_tokens=True)[len(prompt):]
        full = tok.decode(prompt + ids)
        assert "".join(stream(tok, ids, prompt)) == full[len(tok.decode(prompt)):]


def test_multibyte_character_held_back(smollm2_checkpoint: Checkpoint) -> None:
    tok = smollm2_checkpoint.tokenizer
    ids = tok.encode("😀", add_special_tokens=False)
    assert len(ids) > 1  # byte-level BPE splits the emoji into byte tokens
    pieces = stream(tok, ids)
    assert pieces[:-2] == [""] * (len(ids) - 1) and "".join(pieces) == "😀"


def test_byte_fallback_character_held_back(gemma3_checkpoint: Checkpoint) -> None:
    tok = gemma3_checkpoint.tokenizer
    byte_ids = [tok.token_to_id(f"<0x{b:02X}>") for b in "ꙮ".encode()]
    assert all(i is not None for i in byte_ids)
    pieces = stream(tok, [i for i in byte_ids if i is not None])
    assert pieces[:2] == ["", ""] and "".join(pieces) == "ꙮ"


def test_random_ids_stream_equals_decode(tok: Tokenizer) -> None:
    rng = random.Random(1)
    for _ in range(20):
        ids = [rng.randrange(tok.vocab_size) for _ in range(rng.randint(1, 40))]
        assert "".join(stream(tok, ids)) == tok.decode(ids)


def test_tokenizer_detokenizer_helper(smollm2_checkpoint: Checkpoint) -> None:
    tok = smollm2_checkpoint.tokenizer
    detok = tok.detokenizer(prompt_ids=tok.encode("Hi"))
    assert detok.push_many(tok.encode(" there, friend", add_special_tokens=False)) + detok.flush() == \
        " there, friend"
