"""Request fields -> a structured-output constraint and a tool-calling plan.

OpenAI: `response_format` (`text`, `json_object`, `json_schema`), `tools`, `tool_choice`,
`parallel_tool_calls`. vLLM extras: `guided_json`, `guided_regex`, `guided_choice`, `guided_grammar`,
and `structured_outputs` (`{"json" | "regex" | "choice" | "grammar" | "json_object": ...}`). At most one
constraint per request; every problem is a 400 naming the request field.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from mixserve.server.errors import ApiError
from mixserve.server.protocol import ChatCompletionRequest, _Sampling
from mixserve.structured.spec import KINDS, StructuredError, StructuredOutput
from mixserve.structured.tools import Tool, call_constraint, parse_tools, resolve_tool_choice

_GUIDED = {"guided_json": "json", "guided_regex": "regex", "guided_choice": "choice", "guided_grammar": "grammar"}


@dataclass(frozen=True)
class ToolPlan:
    """The tools of a chat request and how the model may use them."""

    tools: list[Tool] = field(default_factory=list)
    choice: str | None = None
    """None (no tools), "none", "auto", "required", or the forced function's name."""
    parallel: bool = True

    @property
    def active(self) -> bool:
        """Tools are shown to the model and calls are parsed from its output."""
        return bool(self.tools) and self.choice != "none"

    @property
    def forced(self) -> list[Tool] | None:
        """The tools one of which must be called (decoding is constrained), or None."""
        if self.choice == "required":
            return self.tools
        if self.choice is not None and self.choice not in ("none", "auto"):
            return [t for t in self.tools if t.name == self.choice]
        return None


def tool_plan(body: ChatCompletionRequest) -> ToolPlan:
    try:
        tools = parse_tools(body.tools or [])
        choice = resolve_tool_choice(body.tool_choice, tools)
    except StructuredError as exc:
        raise ApiError(400, str(exc), param=exc.field) from exc
    return ToolPlan(tools, choice, body.parallel_tool_calls)


def request_structured(body: _Sampling, plan: ToolPlan | None = None) -> StructuredOutput | None:
    """The one constraint a request asks for (None: unconstrained)."""
    asked: list[tuple[str, StructuredOutput]] = []
    fmt = getattr(body, "response_format", None)
    if fmt is not None:
        spec = _response_format(fmt)
        if spec is not None:
            asked.append(("response_format", spec))
    for name, kind in _GUIDED.items():
        value = getattr(body, name)
        if value is not None:
            asked.append((name, _build(name, **{kind: value})))
    if body.structured_outputs is not None:
        asked.append(("structured_outputs", _structured_outputs(body.structured_outputs)))
    if plan is not None and plan.forced is not None:
        asked.append(("tool_choice", call_constraint(plan.forced, plan.parallel)))
    if len(asked) > 1:
        raise ApiError(400, f"invalid field {asked[1][0]}: only one constraint per request "
                       f"({', '.join(n for n, _ in asked)} were given)", param=asked[1][0])
    return asked[0][1] if asked else None


def _response_format(fmt: dict[str, Any]) -> StructuredOutput | None:
    kind = fmt.get("type", "text")
    if kind == "text":
        return None
    if kind == "json_object":
        return _build("response_format", json_object=True)
    if kind != "json_schema":
        raise ApiError(400, f"invalid field response_format.type: {kind!r} is not 'text', 'json_object' or "
                       f"'json_schema'", param="response_format.type")
    spec = fmt.get("json_schema")
    if not isinstance(spec, dict):
        raise ApiError(400, "invalid field response_format.json_schema: must be an object with 'name' and "
                       "'schema'", param="response_format.json_schema")
    schema = spec.get("schema", {"type": "object"})
    if not isinstance(schema, dict):
        raise ApiError(400, "invalid field response_format.json_schema.schema: must be a JSON schema object",
                       param="response_format.json_schema.schema")
    strict = spec.get("strict")
    if strict is not None and not isinstance(strict, bool):
        raise ApiError(400, f"invalid field response_format.json_schema.strict: must be a boolean (got {strict!r})",
                       param="response_format.json_schema.strict")
    # strict or not, the output is constrained to the schema: it always validates
    return _build("response_format.json_schema.schema", json=schema)


def _structured_outputs(value: dict[str, Any]) -> StructuredOutput:
    unknown = sorted(set(value) - set(KINDS))
    if unknown:
        raise ApiError(400, f"invalid field structured_outputs.{unknown[0]}: not one of {', '.join(KINDS)}",
                       param=f"structured_outputs.{unknown[0]}")
    return _build("structured_outputs", **{k: v for k, v in value.items() if v is not None})


def _build(name: str, **kwargs: Any) -> StructuredOutput:
    if "choice" in kwargs and isinstance(kwargs["choice"], list):
        kwargs["choice"] = tuple(kwargs["choice"])
    try:
        return StructuredOutput(**kwargs)
    except StructuredError as exc:
        detail = str(exc).split(": ", 1)[-1]
        raise ApiError(400, f"invalid field {name}: {detail}", param=name) from exc
    except TypeError as exc:
        raise ApiError(400, f"invalid field {name}: {exc}", param=name) from exc
