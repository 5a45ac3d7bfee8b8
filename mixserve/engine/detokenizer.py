"""Incremental detokenization and stop strings, for one sample (pure Python)."""

from __future__ import annotations

from typing import Protocol

REPLACEMENT = "\ufffd"
_CONTEXT_TOKENS = 5


class Decoder(Protocol):
    def decode(self, token_ids: list[int], skip_special_tokens: bool = True) -> str: ...


class IncrementalDetokenizer:
    """Turns tokens into text one at a time; never emits half of a multi-byte character.

    Text is the difference between decoding `ids[prefix:]` and `ids[prefix:read]`, with a few prompt
    tokens as left context so that tokenizers that strip a leading space decode the first token right.
    Pieces ending in U+FFFD (an incomplete UTF-8 sequence) are held back until completed.
    """

    def __init__(self, tokenizer: Decoder, prompt_ids: list[int], skip_special_tokens: bool) -> None:
        self.tokenizer = tokenizer
        self.skip = skip_special_tokens
        self.ids = list(prompt_ids[-_CONTEXT_TOKENS:])
        self.prefix = 0
        self.read = len(self.ids)

    def add(self, token_id: int) -> str:
        self.ids.append(token_id)
        prefix_text = self.tokenizer.decode(self.ids[self.prefix:self.read], self.skip)
        new_text = self.tokenizer.decode(self.ids[self.prefix:], self.skip)
        if len(new_text) > len(prefix_text) and not new_text.endswith(REPLACEMENT):
            self.prefix, self.read = self.read, len(self.ids)
            return new_text[len(prefix_text):]
        return ""

    def flush(self) -> str:
        """Whatever is still held back (e.g. a trailing incomplete character) at the end."""
        prefix_text = self.tokenizer.decode(self.ids[self.prefix:self.read], self.skip)
        new_text = self.tokenizer.decode(self.ids[self.prefix:], self.skip)
        self.prefix = self.read = len(self.ids)
        return new_text[len(prefix_text):] if new_text.startswith(prefix_text) else ""


def find_stop(text: str, num_new_chars: int, stops: tuple[str, ...]) -> tuple[int, str] | None:
    """Earliest stop string that ends inside the last `num_new_chars` characters: (index, stop)."""
    best: tuple[int, str] | None = None
    for stop in stops:
        start = max(0, len(text) - num_new_chars - len(stop) + 1)
        index = text.find(stop, start)
        if index != -1 and (best is None or index < best[0]):
            best = (index, stop)
    return best
