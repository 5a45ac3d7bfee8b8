"""`Tokenizer`: one class over a `tokenizers.Tokenizer`, built from an HF folder or GGUF metadata.

It owns everything text-side the engine needs: encode/decode, special ids, the generation stop ids
and the chat template. `load_tokenizer(path)` picks the source; `gguf_tokenizer.py` rebuilds a
tokenizer from GGUF metadata; `detokenizer.py` streams text out token by token.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import tokenizers
from tokenizers import processors

from mixserve.loading.chat_template import DEFAULT_CHAT_TEMPLATE, ChatTemplateError, render_chat_template
from mixserve.loading.detokenizer import IncrementalDetokenizer
from mixserve.loading.errors import CheckpointError

__all__ = ["Tokenizer", "IncrementalDetokenizer", "load_tokenizer", "load_hf_tokenizer", "ChatTemplateError"]

END_OF_TURN_TOKENS = ("<|im_end|>", "<end_of_turn>", "<|eot_id|>", "<|eom_id|>", "<|end|>", "<|endofturn|>")
"""Chat end-of-turn markers: a stop id whenever the chat template writes one."""


class Tokenizer:
    """Text <-> token ids, special ids, stop ids and chat template of one model.

    Invariants: `eos_token_ids[0]` is the model's own EOS (the others are end-of-turn markers the
    chat template emits); `chat_template` is never None (files without one get
    `DEFAULT_CHAT_TEMPLATE`, flagged by `chat_template_is_default`) unless built with
    `default_chat_template=False`.
    """

    def __init__(self, backend: tokenizers.Tokenizer, *, bos_token_id: int | None,
                 eos_token_ids: Sequence[int], pad_token_id: int | None = None,
                 unk_token_id: int | None = None, chat_template: str | None = None,
                 default_chat_template: bool = True) -> None:
        self.backend = backend
        self.bos_token_id = bos_token_id
        self.pad_token_id = pad_token_id
        self.unk_token_id = unk_token_id
        self.chat_template_is_default = chat_template is None and default_chat_template
        self.chat_template = DEFAULT_CHAT_TEMPLATE if self.chat_template_is_default else chat_template
        eos = list(dict.fromkeys(eos_token_ids))
        for token in END_OF_TURN_TOKENS:
            token_id = backend.token_to_id(token)
            if token_id is not None and token in (self.chat_template or "") and token_id not in eos:
                eos.append(token_id)
        self.eos_token_ids: list[int] = eos
        added = backend.get_added_tokens_decoder()
        named = [i for i in (bos_token_id, pad_token_id, unk_token_id, *eos) if i is not None]
        self.all_special_ids: list[int] = sorted({i for i, t in added.items() if t.special} | set(named))
        # Whether encode(add_special_tokens=True) prepends BOS (the default template then writes it).
        self.add_bos_token = bos_token_id is not None and backend.encode("").ids[:1] == [bos_token_id]

    @property
    def eos_token_id(self) -> int | None:
        return self.eos_token_ids[0] if self.eos_token_ids else None

    @property
    def vocab_size(self) -> int:
        """Number of ids the tokenizer can produce (added tokens included)."""
        return int(self.backend.get_vocab_size(with_added_tokens=True))

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(self.backend.encode(text, add_special_tokens=add_special_tokens).ids)

    def encode_batch(self, texts: Sequence[str], add_special_tokens: bool = True) -> list[list[int]]:
        encodings = self.backend.encode_batch(list(texts), add_special_tokens=add_special_tokens)
        return [list(e.ids) for e in encodings]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        return str(self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens))

    def convert_ids_to_tokens(self, ids: Sequence[int]) -> list[str | None]:
        return [self.backend.id_to_token(int(i)) for i in ids]

    def convert_tokens_to_ids(self, tokens: Sequence[str]) -> list[int | None]:
        return [self.backend.token_to_id(t) for t in tokens]

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self.backend.id_to_token(token_id)

    def special_tokens(self) -> dict[str, str | None]:
        """`bos_token`, `eos_token`, `pad_token`, `unk_token` strings, as chat templates expect them."""
        def text(i: int | None) -> str | None:
            return self.backend.id_to_token(i) if i is not None else None
        return {"bos_token": text(self.bos_token_id), "eos_token": text(self.eos_token_id),
                "pad_token": text(self.pad_token_id), "unk_token": text(self.unk_token_id)}

    def apply_chat_template(self, messages: Sequence[dict[str, Any]], add_generation_prompt: bool = True, *,
                            chat_template: str | None = None, tools: list[dict[str, Any]] | None = None,
                            **kwargs: Any) -> str:
        """Render `messages` (`[{"role": ..., "content": ...}]`) to the prompt text.

        Encode the result with `add_special_tokens=False` (templates write BOS themselves), or use
        `encode_chat`. Raises ChatTemplateError if there is no template or it fails.
        """
        template = chat_template or self.chat_template
        if template is None:
            raise ChatTemplateError("this tokenizer has no chat template; pass chat_template=...")
        return render_chat_template(template, messages, add_generation_prompt=add_generation_prompt,
                                    special_tokens=self.special_tokens(), tools=tools,
                                    add_bos_token=self.add_bos_token, **kwargs)

    def encode_chat(self, messages: Sequence[dict[str, Any]], add_generation_prompt: bool = True,
                    **kwargs: Any) -> list[int]:
        """Prompt ids of a conversation: `apply_chat_template` then encode without adding specials."""
        text = self.apply_chat_template(messages, add_generation_prompt, **kwargs)
        return self.encode(text, add_special_tokens=False)

    def detokenizer(self, prompt_ids: Sequence[int] = (), skip_special_tokens: bool = True
                    ) -> IncrementalDetokenizer:
        return IncrementalDetokenizer(self, prompt_ids=prompt_ids, skip_special_tokens=skip_special_tokens)

    def __repr__(self) -> str:
        return (f"Tokenizer(vocab_size={self.vocab_size}, bos={self.bos_token_id}, eos={self.eos_token_ids}, "
                f"chat_template={'default' if self.chat_template_is_default else bool(self.chat_template)})")


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Tokenizer of an HF folder (`tokenizer.json` ...) or of a GGUF file (its metadata)."""
    path = Path(path)
    if path.is_file():
        from mixserve.loading.gguf_io import GGUFFile
        from mixserve.loading.gguf_tokenizer import gguf_tokenizer
        return gguf_tokenizer(GGUFFile(path))
    return load_hf_tokenizer(path)


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return data


def _token_text(value: Any) -> str | None:
    """tokenizer_config / special_tokens_map entries are a string or `{"content": ...}`."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _ids(value: Any) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, list) else [int(value)]


def _chat_template(folder: Path, tok_config: dict[str, Any]) -> str | None:
    jinja = folder / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    template = tok_config.get("chat_template")
    if template is None:
        template = _read_json(folder / "chat_template.json").get("chat_template")
    if isinstance(template, list):  # [{"name": "default", "template": ...}, {"name": "tool_use", ...}]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default") or next(iter(named.values()), None)
    return template if isinstance(template, str) else None


def load_hf_tokenizer(folder: str | Path, default_chat_template: bool = True) -> Tokenizer:
    """Tokenizer of an HF model folder: `tokenizer.json` plus the optional config files around it."""
    folder = Path(folder)
    tok_file = folder / "tokenizer.json"
    if not tok_file.is_file():
        raise CheckpointError(f"{folder}: no tokenizer.json (mixserve needs the fast-tokenizer file; "
                              f"re-save the tokenizer with transformers' save_pretrained)")
    try:
        backend = tokenizers.Tokenizer.from_file(str(tok_file))
    except Exception as e:  # the Rust side raises plain Exception subclasses
        raise CheckpointError(f"{tok_file}: cannot parse tokenizer ({e})") from e
    tok_config = _read_json(folder / "tokenizer_config.json")
    specials = {**_read_json(folder / "special_tokens_map.json"), **tok_config}
    config, gen_config = _read_json(folder / "config.json"), _read_json(folder / "generation_config.json")

    def special_id(name: str) -> int | None:
        text = _token_text(specials.get(name))
        return backend.token_to_id(text) if text is not None else None

    bos = special_id("bos_token")
    if bos is None:
        bos = next(iter(_ids(gen_config.get("bos_token_id")) or _ids(config.get("bos_token_id"))), None)
    eos_from_tok = [i for i in [special_id("eos_token")] if i is not None]
    eos = _ids(gen_config.get("eos_token_id")) or _ids(config.get("eos_token_id")) or eos_from_tok
    eos = eos + [i for i in eos_from_tok if i not in eos]
    if "add_bos_token" in tok_config or "add_eos_token" in tok_config or backend.post_processor is None:
        _set_post_processor(backend, bos if tok_config.get("add_bos_token") else None,
                            eos[0] if tok_config.get("add_eos_token") and eos else None)
    return Tokenizer(backend, bos_token_id=bos, eos_token_ids=eos, pad_token_id=special_id("pad_token"),
                     unk_token_id=special_id("unk_token"), chat_template=_chat_template(folder, tok_config),
                     default_chat_template=default_chat_template)


def _set_post_processor(backend: tokenizers.Tokenizer, bos_id: int | None, eos_id: int | None) -> None:
    """`[BOS] $A [EOS]` as transformers builds it from add_bos_token / add_eos_token."""
    specials = [(backend.id_to_token(i), i) for i in (bos_id, eos_id) if i is not None]
    bos = f"{backend.id_to_token(bos_id)}:0 " if bos_id is not None else ""
    eos = f" {backend.id_to_token(eos_id)}:0" if eos_id is not None else ""
    pair_bos = f" {backend.id_to_token(bos_id)}:1" if bos_id is not None else ""
    pair_eos = f" {backend.id_to_token(eos_id)}:1" if eos_id is not None else ""
    backend.post_processor = processors.TemplateProcessing(
        single=f"{bos}$A:0{eos}", pair=f"{bos}$A:0{eos}{pair_bos} $B:1{pair_eos}", special_tokens=specials)
