"""Varied texts for tokenizer parity: ascii, CJK, emoji, accents, whitespace runs, code, numbers,
special tokens written in the text, and seeded random strings over a mixed alphabet."""

from __future__ import annotations

import random

FIXED = [
    "Hello world", "The quick brown fox jumps over the lazy dog.", "", " ", "  ", "\n", "\t", "a",
    "  leading and trailing spaces   ", "many     spaces\t\ttabs\n\n\nnewlines\r\n\r\nCRLF",
    "日本語のテキストと中文文本，한국어 텍스트", "emoji 😀🎉👨‍👩‍👧‍👦 ✓ ♥ 🇫🇷",
    "accents: café naïve résumé Ångström Œuvre",
    "Привет, мир! Γειά σου κόσμε. مرحبا بالعالم", "combining e\u0301 and nbsp\u00a0and zero\u200bwidth",
    "def f(x):\n    return x ** 2  # square\n\nclass A:\n\tpass\n",
    "if (a != b && c <= 3) { print(\"{}\".format(x)); }",
    "numbers 1234567890 3.14159 -42 1e-10 0x1F 1,000,000", "2024-01-02T03:04:05Z $19.99 50% #1",
    "special <|im_start|>user\nhi<|im_end|>\n<|endoftext|>",
    "<bos><start_of_turn>user\nhi<end_of_turn>\n<eos>",
    "<think>reasoning</think> <pad> <unk> <mask>", "URL https://example.com/a?b=c&d=e#f email a.b@c.de",
    "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa", "ÿþ\x01\x02\x7f control", "trailing newline\n",
]

_ALPHABET = ("abcdefghijklmnopqrstuvwxyz ABCDEFGHIJ 0123456789 .,;:!?'\"-_()[]{}<>/\\@#$%^&*+=~`|"
             "\n\t  éèêàçñöüß 中文日本語한국 😀🎉🚀 ΑΒΓ абв \u200d\u00a0")


def random_texts(n: int = 40, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return ["".join(rng.choice(_ALPHABET) for _ in range(rng.randint(1, 80))) for _ in range(n)]


TEXTS = FIXED + random_texts()
