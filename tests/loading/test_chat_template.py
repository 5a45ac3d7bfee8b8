"""Chat template rendering: transformers' environment (filters, globals, extensions) and errors."""

from __future__ import annotations

import json

import pytest
import tokenizers
from tokenizers.models import WordLevel

from mixserve.loading.chat_template import DEFAULT_CHAT_TEMPLATE, ChatTemplateError, render_chat_template
from mixserve.loading.tokenizer import Tokenizer

SPECIALS = {"bos_token": "<s>", "eos_token": "</s>", "pad_token": None, "unk_token": None}
MSGS = [{"role": "user", "content": "hi <b>\"x\"</b>"}]


def render(template: str, messages=MSGS, **kw) -> str:
    return render_chat_template(template, messages, add_generation_prompt=True, special_tokens=SPECIALS, **kw)


def test_trim_and_lstrip_blocks() -> None:
    template = "{% for m in messages %}\n    {% if true %}{{ m['role'] }}{% endif %}\n{% endfor %}!"
    assert render(template) == "user!"


def test_tojson_does_not_escape_html_and_takes_options() -> None:
    assert render("{{ messages[0] | tojson }}") == json.dumps(MSGS[0], ensure_ascii=False)
    assert render("{{ {'b': 1, 'a': 'é'} | tojson(sort_keys=True, indent=1) }}") == \
        json.dumps({"b": 1, "a": "é"}, sort_keys=True, indent=1, ensure_ascii=False)


def test_globals_and_extensions() -> None:
    assert len(render("{{ strftime_now('%Y-%m-%d') }}")) == 10
    assert render("{% for i in [1,2,3] %}{% if i == 2 %}{% break %}{% endif %}{{ i }}{% endfor %}") == "1"
    assert render("{% generation %}{{ bos_token }}A{% endgeneration %}") == "<s>A"
    template = "{{ tools[0].name }}|{{ enable_thinking }}"
    assert render(template, tools=[{"name": "t"}], enable_thinking=False) == \
        "t|False"


def test_raise_exception_and_errors() -> None:
    with pytest.raises(ChatTemplateError, match="roles must alternate"):
        render("{{ raise_exception('roles must alternate') }}")
    with pytest.raises(ChatTemplateError, match="does not compile"):
        render("{% for %}")
    with pytest.raises(ChatTemplateError, match="must be a dict with a 'role'"):
        render("x", messages=[{"content": "no role"}])


def test_sandbox_blocks_attribute_escapes() -> None:
    with pytest.raises(ChatTemplateError):
        render("{{ messages.__class__.__mro__[1].__subclasses__() }}")
    with pytest.raises(ChatTemplateError):
        render("{% set _ = messages.append(1) %}")  # immutable sandbox


def _tiny(chat_template: str | None, default: bool = True) -> Tokenizer:
    vocab = {"<s>": 0, "</s>": 1, "hi": 2, "<|im_end|>": 3}
    backend = tokenizers.Tokenizer(WordLevel(vocab, unk_token="<s>"))
    return Tokenizer(backend, bos_token_id=0, eos_token_ids=[1], chat_template=chat_template,
                     default_chat_template=default)


def test_no_template_is_a_clear_error() -> None:
    tok = _tiny(None, default=False)
    with pytest.raises(ChatTemplateError, match="no chat template"):
        tok.apply_chat_template(MSGS)
    assert tok.apply_chat_template(MSGS, chat_template="{{ messages[0]['role'] }}") == "user"


def test_default_template_and_end_of_turn_ids() -> None:
    tok = _tiny(None)
    assert tok.chat_template == DEFAULT_CHAT_TEMPLATE and tok.chat_template_is_default
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}]) == "User: hi\nAssistant:"
    assert tok.eos_token_ids == [1]
    chatml = _tiny("{% for m in messages %}{{ m['content'] }}<|im_end|>{% endfor %}")
    assert chatml.eos_token_ids == [1, 3]  # the template's end-of-turn marker stops generation too
