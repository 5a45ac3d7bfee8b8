"""Streaming token ids out as text without ever emitting half a character.

The offsets scheme (as in vLLM / TGI): decode a short window `ids[prefix_offset:]` and compare it
with the text of `ids[prefix_offset:read_offset]`; the difference is new text. Decoding in a window
that starts a few tokens back keeps context-dependent decoders right (SentencePiece's leading-space
strip, byte-level merges), and the text is held back while it ends in U+FFFD, the mark of an
incomplete UTF-8 sequence (byte-level BPE) or of unfinished byte-fallback tokens (SentencePiece).

Invariant: with no prompt, the concatenation of everything `push` and `flush` return equals
`tokenizer.decode(all_ids)`; with a prompt, it equals the text that decoding prompt + output
adds after the prompt's text.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from mixserve.loading.tokenizer import Tokenizer

_REPLACEMENT = "\ufffd"
_CONTEXT_TOKENS = 5  # prompt tokens kept in the first window, for the decoders that look back


class IncrementalDetokenizer:
    """Feed ids one at a time with `push`; each call returns the text that became final."""

    def __init__(self, tokenizer: Tokenizer, prompt_ids: Sequence[int] = (),
                 skip_special_tokens: bool = True) -> None:
        self._tokenizer = tokenizer
        self._skip_special = skip_special_tokens
        self._ids: list[int] = list(prompt_ids)
        self._num_prompt_ids = len(self._ids)
        self._prefix_offset = max(len(self._ids) - _CONTEXT_TOKENS, 0)
        self._read_offset = len(self._ids)
        self._text_parts: list[str] = []

    @property
    def output_ids(self) -> list[int]:
        """The ids pushed so far (prompt excluded)."""
        return self._ids[self._num_prompt_ids:]

    @property
    def text(self) -> str:
        """All text returned so far."""
        return "".join(self._text_parts)

    def _decode(self, start: int, end: int | None = None) -> str:
        return self._tokenizer.decode(self._ids[start:end], skip_special_tokens=self._skip_special)

    def push(self, token_id: int) -> str:
        """Add one id; return the new text that is now final ('' while a character is incomplete)."""
        self._ids.append(int(token_id))
        prefix_text = self._decode(self._prefix_offset, self._read_offset)
        new_text = self._decode(self._prefix_offset)
        if len(new_text) <= len(prefix_text) or new_text.endswith(_REPLACEMENT):
            return ""
        delta = new_text[len(prefix_text):]
        self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)
        self._text_parts.append(delta)
        return delta

    def push_many(self, token_ids: Iterable[int]) -> str:
        return "".join(self.push(t) for t in token_ids)

    def flush(self) -> str:
        """The held-back tail (possibly ending in U+FFFD if the output really is incomplete)."""
        prefix_text = self._decode(self._prefix_offset, self._read_offset)
        new_text = self._decode(self._prefix_offset)
        delta = new_text[len(prefix_text):]
        self._prefix_offset = self._read_offset = len(self._ids)
        if delta:
            self._text_parts.append(delta)
        return delta
