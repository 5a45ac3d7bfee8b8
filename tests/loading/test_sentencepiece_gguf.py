"""A llama-style SentencePiece GGUF vocabulary (scores, byte fallback, prefix space) against
transformers' GGUF tokenizer, and the detokenizer on its leading-space-stripping decoder."""

from __future__ import annotations

from pathlib import Path

import gguf
import pytest

from mixserve.loading.gguf_io import GGUFFile
from mixserve.loading.gguf_tokenizer import gguf_tokenizer
from mixserve.loading.tokenizer import IncrementalDetokenizer

PIECES = ["▁", "e", "t", "h", "l", "o", "w", "r", "d", "a", "n", "▁t", "he", "▁the", "▁a", "ll", "▁he", "llo",
          "▁hello", "or", "▁w", "▁wor", "ld", "▁world", "an", "▁an", "d", "▁and", "▁▁", "▁▁▁▁", "in", "▁in"]
TEXTS = ["hello world", "the and hello", " leading", "  two  spaces", "world\nand\tthe", "naïve 😀 ok",
         "", "hellohello", "a", "    four"]


@pytest.fixture(scope="module")
def spm_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("spm") / "spm.gguf"
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    types = [2, 3, 3] + [6] * 256
    pieces = list(dict.fromkeys(PIECES))
    tokens += pieces
    types += [1] * len(pieces)
    scores = [0.0] * (3 + 256) + [-float(i) for i in range(len(pieces))]
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_matches_transformers(spm_gguf: Path) -> None:
    from transformers import AutoTokenizer

    ref = AutoTokenizer.from_pretrained(str(spm_gguf.parent), gguf_file=spm_gguf.name)
    ours = gguf_tokenizer(GGUFFile(spm_gguf))
    for text in TEXTS:
        for special in (True, False):
            assert ours.encode(text, add_special_tokens=special) == \
                ref(text, add_special_tokens=special)["input_ids"], text
        ids = ours.encode(text)
        assert ours.decode(ids) == ref.decode(ids, skip_special_tokens=True), text
    assert ours.encode("hello")[0] == 1  # llama vocabularies add BOS unless the file says otherwise


def test_round_trip_and_stream(spm_gguf: Path) -> None:
    tok = gguf_tokenizer(GGUFFile(spm_gguf))
    for text in TEXTS:
        ids = tok.encode(text, add_special_tokens=False)
        if not text.startswith(" "):  # a leading space merges into the prefix "▁" (as in transformers)
            assert tok.decode(ids) == text
        detok = IncrementalDetokenizer(tok)
        assert "".join(detok.push(i) for i in ids) + detok.flush() == tok.decode(ids), text
    # after a prompt, the first output token keeps its leading space (no Strip at a window start)
    prompt = tok.encode("hello")
    out = tok.encode("hello world", add_special_tokens=False)[1:]
    detok = IncrementalDetokenizer(tok, prompt_ids=prompt)
    assert "".join(detok.push(i) for i in out) + detok.flush() == " world"
