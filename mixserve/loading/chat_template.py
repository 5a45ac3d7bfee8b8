"""Rendering chat templates the way transformers does (`apply_chat_template`).

Templates are untrusted jinja2 from model files, so they run in an immutable sandbox, with the
environment transformers provides: `trim_blocks`/`lstrip_blocks`, the `loopcontrols` extension,
a `{% generation %}` block (rendered as-is), `raise_exception`, `strftime_now`, and a `tojson`
filter that does not HTML-escape.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import datetime
from functools import lru_cache
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment

DEFAULT_CHAT_TEMPLATE = (
    "{{ bos_token if add_bos_token else '' }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] }}\n\n"
    "{% elif message['role'] == 'user' %}User: {{ message['content'] }}\n"
    "{% else %}Assistant: {{ message['content'] }}\n"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)
"""For base models whose files carry no template: plain `User:` / `Assistant:` turns."""


class ChatTemplateError(ValueError):
    """No chat template, a template that does not compile, or one that raised while rendering."""


class _GenerationBlock(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}`: marks assistant text for training masks; a no-op here."""

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller: Any) -> str:
        return str(caller())


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


@lru_cache(maxsize=16)
def compile_chat_template(template: str) -> jinja2.Template:
    """Compile once per distinct template string (raises ChatTemplateError on syntax errors)."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[_GenerationBlock, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    try:
        return env.from_string(template)
    except jinja2.TemplateSyntaxError as e:
        raise ChatTemplateError(f"chat template does not compile (line {e.lineno}): {e.message}") from e


def render_chat_template(template: str, messages: Sequence[dict[str, Any]], *, add_generation_prompt: bool,
                         special_tokens: dict[str, str | None], tools: list[dict[str, Any]] | None = None,
                         documents: list[dict[str, Any]] | None = None, **kwargs: Any) -> str:
    """Render `messages` with `template`; `special_tokens` provides `bos_token`, `eos_token`, ...

    Extra keyword arguments (e.g. `enable_thinking=False`) are visible to the template.
    """
    _check_messages(messages)
    variables = {**special_tokens, **kwargs, "messages": [dict(m) for m in messages],
                 "add_generation_prompt": add_generation_prompt, "tools": tools, "documents": documents}
    try:
        return compile_chat_template(template).render(**variables)
    except jinja2.TemplateError as e:
        raise ChatTemplateError(f"chat template failed: {e}") from e


def _check_messages(messages: Sequence[dict[str, Any]]) -> None:
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m:
            raise ChatTemplateError(f"message {i} must be a dict with a 'role' (got {m!r:.80})")
