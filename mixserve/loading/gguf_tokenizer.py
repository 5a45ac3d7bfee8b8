"""Rebuilding a tokenizer from GGUF metadata (`tokenizer.ggml.*`) with the `tokenizers` library.

Two vocabulary kinds, following transformers' GGUF converters (integrations/gguf) and llama.cpp:
- `gpt2`: byte-level BPE. Tokens are already spelled in the GPT-2 byte alphabet; merges are in the
  file; the split regex is chosen by `tokenizer.ggml.pre`.
- `llama`: SentencePiece BPE with byte fallback and `▁` for spaces. The file has scores, not merges,
  so merges are rebuilt from the vocabulary (best-scored token first). Gemma files differ: pieces of
  only spaces are stored as real spaces, scores do not follow merge order (file order does), and
  text is not given a prefix space.
Token types (llama.cpp): 1 normal, 2 unknown, 3 control, 4 user-defined, 5 unused, 6 byte.
Control tokens become special added tokens, user-defined ones plain added tokens, so both are
matched whole in text.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from tokenizers import AddedToken, Regex, decoders, normalizers, pre_tokenizers, processors
from tokenizers import Tokenizer as Backend
from tokenizers.models import BPE

from mixserve.loading.errors import CheckpointError
from mixserve.loading.gguf_io import GGUFFile
from mixserve.loading.tokenizer import Tokenizer

_CONTROL, _USER_DEFINED = 3, 4

_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_GPT4O_SPLIT = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
                r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
                r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
                r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+"
                r"|\s+(?!\S)|\s+")
_PRE_SPLITS = {
    "llama3": _LLAMA3_SPLIT, "llama-v3": _LLAMA3_SPLIT, "llama-bpe": _LLAMA3_SPLIT,
    "smaug-bpe": _LLAMA3_SPLIT, "dbrx": _LLAMA3_SPLIT, "falcon3": _LLAMA3_SPLIT,
    "qwen2": _QWEN2_SPLIT, "deepseek-r1-qwen": _QWEN2_SPLIT, "megrez": _QWEN2_SPLIT,
    "gpt-4o": _GPT4O_SPLIT, "llama4": _GPT4O_SPLIT,
}
"""`tokenizer.ggml.pre` -> split regex; unlisted names (gpt2, default, olmo, ...) use GPT-2's."""


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = {}, 0
    for b in range(256):
        if b in keep:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


def _byte_level_pre_tokenizer(pre: str | None) -> pre_tokenizers.PreTokenizer:
    if pre == "smollm":  # llama.cpp: every digit its own piece, then GPT-2's regex
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    split = _PRE_SPLITS.get(pre or "")
    if split is None:
        return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    return pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(split), behavior="isolated"),
                                    pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])


def _byte_level(meta: dict[str, Any], tokens: list[str]) -> tuple[Backend, list[str]]:
    alphabet = _bytes_to_unicode()
    allowed = set(alphabet.values())
    spelled = [t if set(t) <= allowed else "".join(alphabet[b] for b in t.encode("utf-8")) for t in tokens]
    merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges", [])]
    backend = Backend(BPE(vocab={t: i for i, t in enumerate(spelled)}, merges=merges, fuse_unk=False))
    backend.pre_tokenizer = _byte_level_pre_tokenizer(meta.get("tokenizer.ggml.pre"))
    backend.decoder = decoders.ByteLevel()
    # A control token outside the byte alphabet is a llama.cpp mislabel; adding it would grow the vocab.
    control_ok = [set(t) <= allowed for t in tokens]
    return backend, [t for t, ok in zip(tokens, control_ok) if ok]


def _merges_from_scores(vocab: dict[str, int], scores: dict[str, float]) -> list[tuple[str, str]]:
    """SentencePiece-BPE merges implied by a vocabulary: each token's splits into two known pieces,
    best score first (transformers' `generate_merges`: same order and tie-breaks, ~2x faster)."""
    get = vocab.get
    keyed: list[tuple[float, int, int, str, str]] = []
    for token, score in scores.items():
        n = len(token)
        local: list[tuple[int, int, int]] = []
        for i in range(1, n):
            left = get(token[:i])
            if left is not None:
                right = get(token[i:])
                if right is not None:
                    local.append((left, right, i))
        if len(local) > 1:
            local.sort()  # by (left id, right id), as generate_merges does before its stable sort
        keyed.extend((score, i, n - i, token[:i], token[i:]) for _, _, i in local)
    keyed.sort(key=lambda m: m[:3], reverse=True)
    return [(m[3], m[4]) for m in keyed]


def _sentencepiece(meta: dict[str, Any], tokens: list[str], gemma: bool) -> Backend:
    if gemma:  # whitespace-only pieces are stored as spaces; HF's Gemma vocabulary spells them with ▁
        tokens = ["\u2581" * len(t) if " " in t and not t.strip() else t for t in tokens]
    vocab = {t: i for i, t in enumerate(tokens)}
    if gemma:
        scores = {t: -float(i) for i, t in enumerate(tokens)}
    else:
        raw = meta.get("tokenizer.ggml.scores")
        scores = dict(zip(tokens, (raw.tolist() if raw is not None else [0.0] * len(tokens))))
    unk_id = meta.get("tokenizer.ggml.unknown_token_id")
    unk = tokens[int(unk_id)] if gemma and unk_id is not None else None
    backend = Backend(BPE(vocab=vocab, merges=_merges_from_scores(vocab, scores), unk_token=unk,
                          fuse_unk=True, byte_fallback=True))
    steps: list[decoders.Decoder] = [decoders.Replace("\u2581", " "), decoders.ByteFallback(),
                                     decoders.Fuse()]
    if gemma:
        backend.normalizer = normalizers.Replace(" ", "\u2581")
        backend.pre_tokenizer = pre_tokenizers.Split(" ", behavior="merged_with_previous")
    else:
        prefix = bool(meta.get("tokenizer.ggml.add_space_prefix", True))
        backend.pre_tokenizer = pre_tokenizers.Metaspace(
            replacement="\u2581", prepend_scheme="first" if prefix else "never", split=False)
        if prefix:
            steps.append(decoders.Strip(content=" ", left=1, right=0))
    backend.decoder = decoders.Sequence(steps)
    return backend


def _add_special(backend: Backend, tokens: list[str], types: Sequence[int], control_ok: set[str]) -> None:
    control = [AddedToken(t, normalized=False, special=True)
               for t, kind in zip(tokens, types) if kind == _CONTROL and t in control_ok]
    if control:
        backend.add_special_tokens(control)
    user = [AddedToken(t, normalized=False, special=False) for t, kind in zip(tokens, types)
            if kind == _USER_DEFINED and backend.token_to_id(t) is not None]
    if user:
        backend.add_tokens(user)


def gguf_tokenizer(gguf: GGUFFile) -> Tokenizer:
    """The tokenizer described by a GGUF file's metadata (raises CheckpointError if it has none)."""
    meta = gguf.metadata
    kind = meta.get("tokenizer.ggml.model")
    tokens = meta.get("tokenizer.ggml.tokens")
    if kind is None or tokens is None:
        raise CheckpointError(f"{gguf.path}: GGUF has no tokenizer metadata (tokenizer.ggml.model/tokens)")
    types = meta.get("tokenizer.ggml.token_type")
    types_list: list[int] = types.tolist() if isinstance(types, np.ndarray) else [1] * len(tokens)
    if kind == "gpt2":
        backend, ok = _byte_level(meta, tokens)
        control_ok = set(ok)
    elif kind == "llama":
        backend = _sentencepiece(meta, tokens, gemma=gguf.architecture.startswith("gemma"))
        control_ok = set(tokens)
    else:
        raise CheckpointError(f"{gguf.path}: GGUF tokenizer model {kind!r} is not supported "
                              f"(gpt2 and llama are)")
    _add_special(backend, tokens, types_list, control_ok)

    def token_id(key: str) -> int | None:
        value = meta.get(f"tokenizer.ggml.{key}")
        return int(value) if value is not None else None

    bos, eos = token_id("bos_token_id"), token_id("eos_token_id")
    add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", kind == "llama")) and bos is not None
    add_eos = bool(meta.get("tokenizer.ggml.add_eos_token", False)) and eos is not None
    _set_template(backend, tokens, bos if add_bos else None, eos if add_eos else None)
    stop = [i for i in (eos, token_id("eot_token_id"), token_id("eom_token_id")) if i is not None]
    return Tokenizer(backend, bos_token_id=bos, eos_token_ids=stop, pad_token_id=token_id("padding_token_id"),
                     unk_token_id=token_id("unknown_token_id"),
                     chat_template=meta.get("tokenizer.chat_template"))


def _set_template(backend: Backend, tokens: list[str], bos: int | None, eos: int | None) -> None:
    single = ([f"{tokens[bos]}:0"] if bos is not None else []) + ["$A:0"] + \
        ([f"{tokens[eos]}:0"] if eos is not None else [])
    pair = single + ([f"{tokens[bos]}:1"] if bos is not None else []) + ["$B:1"] + \
        ([f"{tokens[eos]}:1"] if eos is not None else [])
    specials = [(tokens[i], i) for i in (bos, eos) if i is not None]
    backend.post_processor = processors.TemplateProcessing(single=" ".join(single), pair=" ".join(pair),
                                                           special_tokens=specials)
