"""Structured outputs and tool calls through the official `openai` client on the embedded real model."""

from __future__ import annotations

import json
import re
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import jsonschema
import openai
import pytest

from tests.server.conftest import MODEL_NAME, Server
from tests.structured.schemas import generated_schemas

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {
        "city": {"type": "string", "maxLength": 20},
        "unit": {"enum": ["celsius", "fahrenheit"]}}, "required": ["city", "unit"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "description": "Current time in a timezone",
    "parameters": {"type": "object", "properties": {"timezone": {"type": "string", "maxLength": 24}},
                   "required": ["timezone"]}}}
BAD_PARAMS = {"type": "object", "properties": {"a": {"type": "wat"}}}
ASK = [{"role": "user", "content": "What is the weather like in Paris?"}]


@pytest.fixture(scope="module")
def client(server: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0, timeout=900)


def _chat(client: openai.OpenAI, **kwargs: Any) -> Any:
    return client.chat.completions.create(model=MODEL_NAME, **{"messages": ASK, "max_tokens": 120, **kwargs})


def test_twenty_generated_schemas_all_validate(client: openai.OpenAI) -> None:
    schemas = generated_schemas(20)

    def one(i: int) -> tuple[dict[str, Any], Any]:
        fmt = {"type": "json_schema", "json_schema": {"name": f"s{i}", "schema": schemas[i], "strict": True}}
        msgs = [{"role": "user", "content": "Describe an object as JSON."}]
        return schemas[i], _chat(client, messages=msgs, response_format=fmt, temperature=0.7, seed=i, max_tokens=160)

    with ThreadPoolExecutor(10) as pool:
        results = list(pool.map(one, range(len(schemas))))
    for schema, resp in results:
        choice = resp.choices[0]
        assert choice.finish_reason == "stop", (schema, choice)
        jsonschema.validate(json.loads(choice.message.content), schema)


def test_json_object_n4_and_majority_strategy(client: openai.OpenAI) -> None:
    resp = _chat(client, response_format={"type": "json_object"}, n=4, temperature=0.8, seed=3)
    assert len(resp.choices) == 4
    for choice in resp.choices:
        if choice.finish_reason == "stop":
            assert isinstance(json.loads(choice.message.content), dict)
        else:
            assert choice.finish_reason == "length"
    schema = {"type": "object", "properties": {"answer": {"enum": ["yes", "no"]}}, "required": ["answer"],
              "additionalProperties": False}
    fmt = {"type": "json_schema", "json_schema": {"name": "a", "schema": schema}}
    resp = _chat(client, response_format=fmt, n=4, temperature=1.0, seed=5, max_tokens=30)
    for choice in resp.choices:
        jsonschema.validate(json.loads(choice.message.content), schema)
    scaled = _chat(client, response_format=fmt, temperature=1.0, seed=5, max_tokens=30,
                   extra_body={"strategy": "majority", "budget": 4})
    jsonschema.validate(json.loads(scaled.choices[0].message.content), schema)


def test_regex_choice_and_grammar_extras(client: openai.OpenAI) -> None:
    resp = _chat(client, extra_body={"guided_regex": r"[0-9]{3}-[A-Z]{2}"}, temperature=1.0, n=3, seed=1)
    for choice in resp.choices:
        assert re.fullmatch(r"[0-9]{3}-[A-Z]{2}", choice.message.content)
    resp = _chat(client, extra_body={"guided_choice": ["sunny", "rainy", "cloudy"]}, temperature=1.0, n=3, seed=2)
    assert all(c.message.content in ("sunny", "rainy", "cloudy") for c in resp.choices)
    grammar = 'start: "The weather is " mood "."\nmood: "good" | "bad"'
    resp = _chat(client, extra_body={"structured_outputs": {"grammar": grammar}}, temperature=1.0, seed=3)
    assert resp.choices[0].message.content in ("The weather is good.", "The weather is bad.")
    gbnf = 'root ::= "x" [0-9]+ "y"'
    resp = client.completions.create(model=MODEL_NAME, prompt="Code:", max_tokens=10, temperature=0,
                                     extra_body={"guided_grammar": gbnf})
    text = resp.choices[0].text
    assert re.fullmatch(r"x[0-9]+y", text) or (resp.choices[0].finish_reason == "length"
                                               and re.fullmatch(r"x[0-9]*", text))


def test_max_tokens_ends_unfinished_constraint_with_length(client: openai.OpenAI) -> None:
    schema = {"type": "object", "properties": {"story": {"type": "string", "minLength": 200}}, "required": ["story"]}
    fmt = {"type": "json_schema", "json_schema": {"name": "s", "schema": schema}}
    resp = _chat(client, response_format=fmt, max_tokens=8, temperature=0)
    assert resp.choices[0].finish_reason == "length"


def _valid_call(call: Any, tools: list[dict[str, Any]]) -> None:
    tool = next(t for t in tools if t["function"]["name"] == call.function.name)
    jsonschema.validate(json.loads(call.function.arguments), tool["function"]["parameters"])
    assert call.id.startswith("call_") and call.type == "function"


def test_tool_choice_required_and_named_give_valid_calls(client: openai.OpenAI) -> None:
    tools = [WEATHER, TIME]
    resp = _chat(client, tools=tools, tool_choice="required", temperature=0.8, n=2, seed=4)
    for choice in resp.choices:
        assert choice.finish_reason == "tool_calls", choice
        assert choice.message.tool_calls
        for call in choice.message.tool_calls:
            _valid_call(call, tools)
    named = {"type": "function", "function": {"name": "get_time"}}
    resp = _chat(client, tools=tools, tool_choice=named, temperature=0.8, seed=6, parallel_tool_calls=False)
    calls = resp.choices[0].message.tool_calls
    assert resp.choices[0].finish_reason == "tool_calls" and len(calls) == 1
    assert calls[0].function.name == "get_time"
    _valid_call(calls[0], tools)


def test_streamed_tool_call_deltas_reassemble_to_the_same_call(client: openai.OpenAI) -> None:
    tools = [WEATHER, TIME]
    whole = _chat(client, tools=tools, tool_choice="required", temperature=0)
    stream = _chat(client, tools=tools, tool_choice="required", temperature=0, stream=True)
    calls: dict[int, dict[str, str]] = {}
    finish = None
    for chunk in stream:
        for choice in chunk.choices:
            finish = choice.finish_reason or finish
            for delta in choice.delta.tool_calls or []:
                entry = calls.setdefault(delta.index, {"id": "", "name": "", "arguments": ""})
                entry["id"] += delta.id or ""
                if delta.function is not None:
                    entry["name"] += delta.function.name or ""
                    entry["arguments"] += delta.function.arguments or ""
    expected = [(c.function.name, c.function.arguments) for c in whole.choices[0].message.tool_calls]
    assert [(calls[i]["name"], calls[i]["arguments"]) for i in sorted(calls)] == expected
    assert all(calls[i]["id"].startswith("call_") for i in calls)
    assert finish == "tool_calls"


def test_tool_history_and_auto_choice_are_accepted(client: openai.OpenAI) -> None:
    history = ASK + [
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather",
                                                               "arguments": '{"city": "Paris", "unit": "celsius"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": '{"temperature": 21, "sky": "clear"}'}]
    resp = _chat(client, messages=history, tools=[WEATHER], tool_choice="auto", temperature=0, max_tokens=30)
    choice = resp.choices[0]
    assert choice.finish_reason in ("stop", "length", "tool_calls")
    for call in choice.message.tool_calls or []:
        assert call.function.name == "get_weather"


@pytest.mark.parametrize(("kwargs", "param"), [
    ({"extra_body": {"guided_regex": "([a-"}}, "guided_regex"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "objekt"}}}},
     "response_format.json_schema.schema"),
    ({"response_format": {"type": "xml"}}, "response_format.type"),
    ({"extra_body": {"guided_grammar": "start: undefined_rule"}}, "guided_grammar"),
    ({"extra_body": {"guided_choice": []}}, "guided_choice"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}},
     "tool_choice.function.name"),
    ({"tools": [{"type": "retrieval"}]}, "tools.0.type"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": BAD_PARAMS}}]},
     "tools.0.function.parameters"),
    ({"response_format": {"type": "json_object"}, "extra_body": {"guided_regex": "a+"}}, "guided_regex"),
    ({"response_format": {"type": "json_object"}, "stop": ["}"]}, "stop"),
])
def test_invalid_constraints_are_400_naming_the_field(client: openai.OpenAI, kwargs: dict[str, Any],
                                                      param: str) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        _chat(client, **kwargs)
    error = info.value.body
    assert isinstance(error, dict)
    assert error.get("param") == param, error
    assert param.split(".")[0] in error["message"]
