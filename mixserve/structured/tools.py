"""OpenAI tool calling: tool definitions, `tool_choice`, the grammar of forced calls, and call parsing.

Calls are written in the Hermes format that most open chat models were trained on:
`<tool_call>\\n{"name": "f", "arguments": {...}}\\n</tool_call>`, one block per call, separated by a
newline. With `tool_choice="required"` or a named function the output is constrained to such blocks
(a Lark grammar embedding each function's parameter schema), so the arguments always parse and match.
With `"auto"` the model may answer in text or in calls; calls are parsed out of the text afterwards.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Any

from mixserve.structured.spec import JSON_OPTIONS, StructuredError, StructuredOutput

CALL_OPEN = "<tool_call>\n"
CALL_CLOSE = "\n</tool_call>"
_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
_OPEN_TAG = "<tool_call>"


@dataclass(frozen=True)
class Tool:
    """One function the model may call."""

    name: str
    description: str
    parameters: dict[str, Any]
    """The JSON schema of the arguments (an object schema)."""


@dataclass(frozen=True)
class ToolCall:
    """A call parsed from generated text; `arguments` is the JSON text exactly as generated."""

    name: str
    arguments: str
    id: str = field(default_factory=lambda: f"call_{uuid.uuid4().hex[:24]}")

    def as_dict(self) -> dict[str, Any]:
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


def parse_tools(tools: list[dict[str, Any]]) -> list[Tool]:
    """OpenAI `tools` -> Tools; raises StructuredError naming `tools.<i>...` for anything unsupported."""
    out: list[Tool] = []
    for i, entry in enumerate(tools):
        where = f"tools.{i}"
        if not isinstance(entry, dict) or entry.get("type") != "function":
            raise StructuredError(f"invalid field {where}.type: only 'function' tools are supported "
                                  f"(got {entry.get('type') if isinstance(entry, dict) else entry!r})",
                                  field=f"{where}.type")
        fn = entry.get("function")
        if not isinstance(fn, dict):
            raise StructuredError(f"invalid field {where}.function: must be an object", field=f"{where}.function")
        name = fn.get("name")
        if not isinstance(name, str) or not _NAME.match(name):
            raise StructuredError(f"invalid field {where}.function.name: {name!r} must be 1-64 letters, digits, "
                                  f"'_', '.' or '-'", field=f"{where}.function.name")
        if any(t.name == name for t in out):
            raise StructuredError(f"invalid field {where}.function.name: {name!r} is defined twice",
                                  field=f"{where}.function.name")
        params = fn.get("parameters", {"type": "object", "properties": {}})
        if not isinstance(params, dict) or params.get("type", "object") != "object":
            raise StructuredError(f"invalid field {where}.function.parameters: must be a JSON schema of type "
                                  f"'object'", field=f"{where}.function.parameters")
        try:
            StructuredOutput(json=params)
        except StructuredError as exc:
            detail = str(exc).split(": ", 1)[-1]
            raise StructuredError(f"invalid field {where}.function.parameters: {detail}",
                                  field=f"{where}.function.parameters") from exc
        description = fn.get("description") or ""
        out.append(Tool(name, description if isinstance(description, str) else str(description), params))
    return out


def resolve_tool_choice(choice: str | dict[str, Any] | None, tools: list[Tool]) -> str | None:
    """`"none"`, `"auto"`, `"required"`, or the name of the forced function; None when there are no tools."""
    if not tools:
        if choice not in (None, "none"):
            raise StructuredError("invalid field tool_choice: requires tools", field="tool_choice")
        return None
    if choice is None:
        return "auto"
    if isinstance(choice, str):
        if choice not in ("none", "auto", "required"):
            raise StructuredError(f"invalid field tool_choice: {choice!r} is not 'none', 'auto', 'required' or "
                                  f"a function", field="tool_choice")
        return choice
    fn = choice.get("function") if isinstance(choice, dict) and choice.get("type") == "function" else None
    name = fn.get("name") if isinstance(fn, dict) else None
    if not isinstance(name, str):
        raise StructuredError("invalid field tool_choice: must be {'type': 'function', 'function': {'name': ...}}",
                              field="tool_choice")
    if all(t.name != name for t in tools):
        raise StructuredError(f"invalid field tool_choice.function.name: {name!r} is not one of the tools "
                              f"({', '.join(t.name for t in tools)})", field="tool_choice.function.name")
    return name


def call_constraint(tools: list[Tool], parallel: bool) -> StructuredOutput:
    """The grammar of one call (or, with `parallel`, one or more) to any of `tools`."""
    variants = [{"type": "object", "properties": {"name": {"const": t.name}, "arguments": t.parameters},
                 "required": ["name", "arguments"], "additionalProperties": False} for t in tools]
    schema = {**(variants[0] if len(variants) == 1 else {"anyOf": variants}), "x-guidance": JSON_OPTIONS}
    repeat = f" ({json.dumps(chr(10))} call)*" if parallel else ""
    lark = (f"start: call{repeat}\ncall: {json.dumps(CALL_OPEN)} body {json.dumps(CALL_CLOSE)}\n"
            f"body: %json {json.dumps(schema)}\n")
    return StructuredOutput(grammar=lark)


def tools_system_prompt(tools: list[Tool]) -> str:
    """Tool instructions for chat templates that do not render tools themselves (Hermes-style)."""
    specs = "\n".join(json.dumps({"type": "function", "function": {
        "name": t.name, "description": t.description, "parameters": t.parameters}}) for t in tools)
    return ("You can call functions. The available functions are:\n<tools>\n" + specs + "\n</tools>\n"
            "To call a function, answer with one block per call:\n<tool_call>\n"
            '{"name": "<function name>", "arguments": {<arguments as JSON>}}\n</tool_call>')


def template_knows_tools(template: str | None) -> bool:
    """The chat template renders `tools` itself (else `tool_messages_as_text` is used)."""
    return template is not None and "tools" in template


def tool_messages_as_text(messages: list[dict[str, Any]], tools: list[Tool]) -> list[dict[str, Any]]:
    """For templates that know no tools: the tool instructions as (part of) the system message,
    assistant calls as `<tool_call>` blocks and tool results as user `<tool_response>` messages."""
    out: list[dict[str, Any]] = []
    for m in messages:
        m = {k: v for k, v in m.items() if k not in ("tool_calls", "tool_call_id")}
        calls = [c.get("function", {}) for c in messages[len(out)].get("tool_calls") or []]
        if calls:
            blocks = [CALL_OPEN + json.dumps({"name": c.get("name"), "arguments": _as_json(c.get("arguments"))})
                      + CALL_CLOSE for c in calls]
            m["content"] = "\n".join(([m["content"]] if m.get("content") else []) + blocks)
        if m["role"] == "tool":
            m = {"role": "user", "content": f"<tool_response>\n{m.get('content') or ''}\n</tool_response>"}
        out.append(m)
    if tools:
        prompt = tools_system_prompt(tools)
        if out and out[0]["role"] == "system":
            out[0] = {**out[0], "content": f"{out[0]['content']}\n\n{prompt}"}
        else:
            out.insert(0, {"role": "system", "content": prompt})
    return out


def _as_json(arguments: Any) -> Any:
    """Call arguments from a history message (a JSON string in OpenAI's shape) as a value."""
    if isinstance(arguments, str):
        try:
            return json.loads(arguments)
        except json.JSONDecodeError:
            return arguments
    return arguments if arguments is not None else {}


def parse_tool_calls(text: str, tools: list[Tool]) -> tuple[str | None, list[ToolCall]]:
    """Split generated text into content (None if empty) and the calls it makes. A `<tool_call>` block
    whose JSON does not parse, or names an unknown function, is left in the content."""
    names = {t.name for t in tools}
    calls: list[ToolCall] = []
    content: list[str] = []
    pos = 0
    while (start := text.find(_OPEN_TAG, pos)) >= 0:
        parsed = _parse_block(text, start + len(_OPEN_TAG), names)
        if parsed is None:
            break
        content.append(text[pos:start])
        call, pos = parsed
        calls.append(call)
    content.append(text[pos:])
    rest = "".join(content).strip()
    return rest or None, calls


def _parse_block(text: str, at: int, names: set[str]) -> tuple[ToolCall, int] | None:
    while at < len(text) and text[at].isspace():
        at += 1
    parsed = _parse_call_object(text, at, names)
    if parsed is None:
        return None
    call, end = parsed
    close = text.find("</tool_call>", end)
    if close < 0 or text[end:close].strip():
        return (call, len(text)) if not text[end:].strip() else None  # unclosed final block
    return call, close + len("</tool_call>")


def _parse_call_object(text: str, at: int, names: set[str]) -> tuple[ToolCall, int] | None:
    """`{"name": ..., "arguments": {...}}` at `at`: the call (arguments as their exact text) and its end."""
    try:
        obj, end = json.JSONDecoder().raw_decode(text, at)
    except json.JSONDecodeError:
        return None
    if not isinstance(obj, dict) or obj.get("name") not in names or not isinstance(obj.get("arguments", {}), dict):
        return None
    return ToolCall(obj["name"], arguments_text(text[at:end])), end


def arguments_text(call_json: str) -> str:
    """The `arguments` value of a call object's JSON text, exactly as written (`{}` if absent)."""
    match = re.search(r'"arguments"\s*:\s*', call_json)
    if match is None:
        return "{}"
    _, end = json.JSONDecoder().raw_decode(call_json, match.end())
    return call_json[match.end():end]


class ToolCallStream:
    """Streams one choice's text as content deltas and OpenAI tool-call deltas.

    Content is held back while it could be the start of `<tool_call>`. A call's first delta carries its
    index, id and name (`arguments: ""`); then argument fragments follow as they are generated. The
    fragments of a call concatenate to the `arguments` that `parse_tool_calls` gives for the whole text.
    """

    def __init__(self, tools: list[Tool]) -> None:
        self.names = {t.name for t in tools}
        self.text = ""
        self.content_sent = 0
        self.call_start: int | None = None
        self.calls: list[ToolCall] = []
        self.named = False
        """The open call's name was sent."""
        self.args_sent = 0

    def push(self, delta: str, final: bool = False) -> tuple[str, list[dict[str, Any]]]:
        """Add generated text; returns (content delta, tool-call deltas)."""
        self.text += delta
        content: list[str] = []
        out: list[dict[str, Any]] = []
        while True:
            if self.call_start is None:
                at = self.text.find(_OPEN_TAG, self.content_sent)
                if at < 0:
                    end = len(self.text) if final else len(self.text) - _partial_tag(self.text)
                    content.append(self.text[self.content_sent:max(end, self.content_sent)])
                    self.content_sent = max(end, self.content_sent)
                    break
                content.append(self.text[self.content_sent:at])
                self.call_start = self.content_sent = at + len(_OPEN_TAG)
            if not self._advance_call(out):
                break
        return "".join(content), out

    def _advance_call(self, out: list[dict[str, Any]]) -> bool:
        """Emit what is new in the open call; True when it closed (scanning goes on after it)."""
        assert self.call_start is not None
        body = self.text[self.call_start:]
        if not self.named:
            named = re.match(r'\s*\{\s*"name"\s*:\s*"([^"]*)"', body)
            if named is None or named.group(1) not in self.names:
                return False
            self.calls.append(ToolCall(named.group(1), ""))
            self.named, self.args_sent = True, 0
            out.append({"index": len(self.calls) - 1, "id": self.calls[-1].id, "type": "function",
                        "function": {"name": named.group(1), "arguments": ""}})
        args = re.search(r'"arguments"\s*:\s*', body)
        if args is None:
            return False
        try:
            end: int | None = json.JSONDecoder().raw_decode(body, args.end())[1]
        except json.JSONDecodeError:
            end = None
        piece = body[args.end() + self.args_sent:len(body) if end is None else end]
        if piece:
            out.append({"index": len(self.calls) - 1, "function": {"arguments": piece}})
            self.args_sent += len(piece)
        close = -1 if end is None else body.find("</tool_call>", end)
        if close < 0:
            return False
        call = self.calls[-1]
        self.calls[-1] = ToolCall(call.name, body[args.end():end], call.id)
        self.content_sent = self.call_start + close + len("</tool_call>")
        self.call_start, self.named = None, False
        return True


def _partial_tag(text: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of `<tool_call>`."""
    for n in range(min(len(_OPEN_TAG) - 1, len(text)), 0, -1):
        if _OPEN_TAG.startswith(text[-n:]):
            return n
    return 0


@dataclass(frozen=True)
class ToolAnswer:
    """One sample of `chat_with_tools`: its text content (None if it only called) and its calls."""

    content: str | None
    tool_calls: list[ToolCall]
    finish_reason: str | None


def chat_with_tools(llm: Any, messages: list[dict[str, Any]], tools: list[dict[str, Any]],
                    tool_choice: str | dict[str, Any] | None = "auto", params: Any = None,
                    parallel_tool_calls: bool = True) -> list[ToolAnswer]:
    """`LLM.chat` with OpenAI tools: renders them (the model's template, or the Hermes default), constrains
    decoding when `tool_choice` is "required" or a named function, and parses the calls of every sample."""
    from dataclasses import replace

    from mixserve.sampling_params import SamplingParams

    parsed = parse_tools(tools)
    choice = resolve_tool_choice(tool_choice, parsed)
    active = bool(parsed) and choice != "none"
    params = params if params is not None else SamplingParams(max_tokens=256)
    if choice not in (None, "none", "auto"):
        forced = parsed if choice == "required" else [t for t in parsed if t.name == choice]
        params = replace(params, structured=call_constraint(forced, parallel_tool_calls))
    template = llm.tokenizer.chat_template
    if active and template_knows_tools(template):
        prompt = llm.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tools=tools)
    else:
        prompt = llm.chat_prompt(tool_messages_as_text(messages, parsed if active else []))
    answers = []
    for sample in llm.generate(prompt, params)[0].outputs:
        content, calls = parse_tool_calls(sample.text, parsed) if active else (sample.text, [])
        reason = sample.finish_reason.value if sample.finish_reason is not None else None
        answers.append(ToolAnswer(content, calls, "tool_calls" if calls and reason == "stop" else reason))
    return answers
