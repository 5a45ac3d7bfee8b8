"""Bad input over raw HTTP: OpenAI-shaped errors with the right status, field named, never a 500."""

from __future__ import annotations

import httpx
import pytest

from tests.server.conftest import MAX_MODEL_LEN, MODEL_NAME, Server

COMPLETIONS = "/v1/completions"
CHAT = "/v1/chat/completions"
MSG = [{"role": "user", "content": "hi"}]


def post(server: Server, path: str, content: bytes | None = None, json: object = None) -> httpx.Response:
    headers = {"content-type": "application/json"}
    return httpx.post(server.url + path, content=content, json=json, headers=headers, timeout=60)


def assert_error(resp: httpx.Response, status: int, param: str | None = None, contains: str = "") -> dict:
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert isinstance(err["message"], str) and err["message"]
    assert contains.lower() in err["message"].lower(), err["message"]
    if param is not None:
        assert err["param"] == param, err
    return err


@pytest.mark.parametrize("body", [b"{not json", b"", b"\xff\xfe", b'{"prompt": "x",}'])
def test_malformed_json(server: Server, body: bytes) -> None:
    err = assert_error(post(server, COMPLETIONS, content=body), 400, contains="JSON")
    assert err["type"] == "invalid_request_error"


@pytest.mark.parametrize("body, param", [
    ({"prompt": "x", "max_tokens": "5"}, "max_tokens"),
    ({"prompt": "x", "temperature": "hot"}, "temperature"),
    ({"prompt": "x", "n": 1.5}, "n"),
    ({"prompt": "x", "stream": "yes"}, "stream"),
    ({"prompt": 42}, "prompt"),
    ({"prompt": [1, "a"]}, "prompt"),
    ({"prompt": "x", "stop": 3}, "stop"),
    ({"prompt": "x", "logprobs": True}, "logprobs"),
])
def test_wrong_types_name_the_field(server: Server, body: dict, param: str) -> None:
    assert_error(post(server, COMPLETIONS, json=body), 400, param=param)


@pytest.mark.parametrize("body, param", [
    ({"prompt": "x", "max_tokens": -1}, "max_tokens"),
    ({"prompt": "x", "max_tokens": 0}, "max_tokens"),
    ({"prompt": "x", "n": 100000}, "n"),
    ({"prompt": "x", "n": 0}, "n"),
    ({"prompt": "x", "temperature": -0.5}, "temperature"),
    ({"prompt": "x", "top_p": 0}, "top_p"),
    ({"prompt": "x", "presence_penalty": 5}, "presence_penalty"),
    ({"prompt": "x", "logprobs": 50}, "logprobs"),
    ({"prompt": "x", "best_of": 3}, "best_of"),
    ({"prompt": "x", "logit_bias": {"abc": 10}}, "logit_bias"),
    ({"prompt": "x", "logit_bias": {"5": 500}}, "logit_bias"),
    ({"prompt": "x", "logit_bias": {"99999999": 1}}, "logit_bias"),
    ({"prompt": "", "max_tokens": 1}, "prompt"),
    ({"prompt": [], "max_tokens": 1}, "prompt"),
    ({"prompt": [10 ** 9], "max_tokens": 1}, "prompt"),
    ({"prompt": "x", "max_tokens": 10 ** 6}, "max_tokens"),
])
def test_out_of_range_values(server: Server, body: dict, param: str) -> None:
    assert_error(post(server, COMPLETIONS, json=body), 400, param=param)


def test_prompt_over_the_context(server: Server) -> None:
    ids = [100] * (MAX_MODEL_LEN + 10)
    err = assert_error(post(server, COMPLETIONS, json={"prompt": ids, "max_tokens": 1}), 400, param="prompt",
                       contains="context length")
    assert err["code"] == "context_length_exceeded"
    long_chat = [{"role": "user", "content": "word " * (MAX_MODEL_LEN + 10)}]
    assert_error(post(server, CHAT, json={"messages": long_chat}), 400, param="prompt")


def test_unknown_model_is_404(server: Server) -> None:
    for path, body in ((COMPLETIONS, {"prompt": "x"}), (CHAT, {"messages": MSG})):
        err = assert_error(post(server, path, json={**body, "model": "gpt-4o"}), 404, param="model")
        assert err["code"] == "model_not_found" and err["type"] == "not_found_error"


def test_unknown_fields_are_ignored_and_reported(server: Server) -> None:
    resp = post(server, COMPLETIONS, json={"prompt": "x", "max_tokens": 1, "model": MODEL_NAME, "frobnicate": 1})
    assert resp.status_code == 200
    assert resp.headers["x-mixserve-ignored-fields"] == "frobnicate"


@pytest.mark.parametrize("body, param", [
    ({}, "messages"),
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "wizard", "content": "x"}]}, "messages.0.role"),
    ({"messages": [{"content": "x"}]}, "messages.0.role"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
     "messages.0.content"),
    ({"messages": MSG, "max_completion_tokens": 0}, "max_completion_tokens"),
    ({"messages": MSG, "top_logprobs": 3}, "top_logprobs"),
    ({"messages": MSG, "logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ({"messages": MSG, "tools": [{"type": "retrieval"}]}, "tools.0.type"),
    ({"messages": MSG, "tool_choice": "required"}, "tool_choice"),
    ({"messages": MSG, "response_format": {"type": "xml"}}, "response_format.type"),
    ({"messages": MSG, "stream_options": {"include_usage": 1}}, "stream_options.include_usage"),
])
def test_chat_errors(server: Server, body: dict, param: str) -> None:
    assert_error(post(server, CHAT, json=body), 400, param=param)


def test_tokenize_errors_and_unknown_routes(server: Server) -> None:
    assert_error(post(server, "/tokenize", json={}), 400, param="prompt")
    assert_error(post(server, "/detokenize", json={"tokens": [-1]}), 400, param="tokens")
    assert_error(httpx.get(server.url + "/v1/nothing-here"), 404)
    assert_error(httpx.get(server.url + COMPLETIONS), 405)


def test_streaming_request_errors_before_the_stream_starts(server: Server) -> None:
    resp = post(server, COMPLETIONS, json={"prompt": "x", "stream": True, "max_tokens": -3})
    assert_error(resp, 400, param="max_tokens")


def test_no_server_errors_were_counted(server: Server) -> None:
    """Everything above was the client's fault: the server never answered 5xx."""
    text = httpx.get(server.url + "/metrics").text
    assert 'status="500"' not in text
    assert httpx.get(server.url + "/health").status_code == 200
