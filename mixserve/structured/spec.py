"""What a constrained request asks for: one of a JSON schema, any JSON object, a regex, a choice among
strings, or a context-free grammar (Lark or GBNF). No torch here (it is part of `SamplingParams`).

Every constraint is compiled to one llguidance grammar string (`StructuredOutput.grammar`), checked at
construction: an invalid schema, regex or grammar raises `StructuredError` naming the field. The
tokenizer-specific work (token masks) happens in the runner (`mixserve.structured.constraints`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from mixserve.config import FieldError

KINDS = ("json", "json_object", "regex", "choice", "grammar")
"""The fields of `StructuredOutput`, exactly one of which is set."""

JSON_OPTIONS: dict[str, Any] = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
"""JSON is generated in one fixed layout (`{"a": 1, "b": [2, 3]}`): a small model cannot loop on
whitespace, and every output of a schema parses the same way."""


class StructuredError(FieldError):
    """A constraint is invalid; the message names the field (`structured.regex`, ...) and what is wrong."""


@dataclass(frozen=True)
class StructuredOutput:
    """A constraint on the generated text; exactly one field is set. Output that stops normally
    (EOS) always matches it completely; output cut by `max_tokens` ends with finish reason `length`."""

    json: str | dict[str, Any] | None = None
    """A JSON schema (a dict or its JSON text); stored as JSON text."""
    json_object: bool = False
    """Any JSON object (OpenAI's `response_format={"type": "json_object"}`)."""
    regex: str | None = None
    """A regular expression the whole output matches (Rust `regex` syntax, anchored)."""
    choice: tuple[str, ...] | None = None
    """The output is exactly one of these strings."""
    grammar: str | None = None
    """A context-free grammar in Lark syntax (llguidance dialect) or llama.cpp's GBNF."""
    compiled: str = field(default="", compare=False, repr=False)
    """The llguidance grammar (filled at construction; the key of the runner's compiled-grammar cache)."""

    def __post_init__(self) -> None:
        if isinstance(self.json, dict):
            object.__setattr__(self, "json", json.dumps(self.json))
        if self.choice is not None:
            object.__setattr__(self, "choice", tuple(self.choice))
        set_fields = [k for k in KINDS if getattr(self, k) not in (None, False)]
        if len(set_fields) != 1:
            raise StructuredError(f"invalid field structured: exactly one of {', '.join(KINDS)} must be set "
                                  f"(got {set_fields or 'none'})", field="structured")
        object.__setattr__(self, "compiled", compile_grammar(self))

    @property
    def kind(self) -> str:
        """Which constraint this is: one of KINDS."""
        return next(k for k in KINDS if getattr(self, k) not in (None, False))

    @property
    def schema(self) -> dict[str, Any] | None:
        """The JSON schema as a dict (json_object: `{"type": "object"}`), None for other kinds."""
        if self.json_object:
            return {"type": "object"}
        return json.loads(self.json) if isinstance(self.json, str) else None


def compile_grammar(spec: StructuredOutput) -> str:
    """The llguidance grammar of `spec`, validated; raises StructuredError naming the field."""
    import llguidance  # the control plane imports it lazily: most requests never need it

    name = f"structured.{spec.kind}"
    try:
        if spec.json is not None or spec.json_object:
            schema = spec.schema
            if not isinstance(schema, dict):
                raise ValueError("a JSON schema must be a JSON object")
            text = llguidance.LLMatcher.grammar_from_json_schema(schema, overrides=JSON_OPTIONS)  # type: ignore[arg-type]
        elif spec.regex is not None:
            if not isinstance(spec.regex, str) or not spec.regex:
                raise ValueError("must be a non-empty string")
            text = llguidance.LLMatcher.grammar_from_regex(spec.regex)
        elif spec.choice is not None:
            if not spec.choice or any(not isinstance(c, str) or not c for c in spec.choice):
                raise ValueError("must be a non-empty list of non-empty strings")
            text = llguidance.LLMatcher.grammar_from_lark("start: " + " | ".join(json.dumps(c) for c in spec.choice))
        else:
            if not isinstance(spec.grammar, str) or not spec.grammar.strip():
                raise ValueError("must be a non-empty Lark or GBNF grammar")
            text = llguidance.grammar_from("grammar", spec.grammar)
    except (ValueError, TypeError) as exc:
        raise StructuredError(f"invalid field {name}: {exc}", field=name) from exc
    error = llguidance.LLMatcher.validate_grammar(text)
    if error:
        raise StructuredError(f"invalid field {name}: {error.strip()}", field=name)
    return text
