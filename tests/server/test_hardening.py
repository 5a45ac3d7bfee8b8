"""Hostile input, one test per class: a 4xx in the OpenAI error shape naming the field, server still healthy."""

from __future__ import annotations

import json
import socket
import threading
import time

import httpx
import pytest

from mixserve.server.schemas import CompletionResponse, TokenizerInfo
from tests.server.conftest import MODEL_NAME, Server

COMPLETIONS = "/v1/completions"
CHAT = "/v1/chat/completions"


def raw_post(server: Server, path: str, body: bytes, timeout: float = 120) -> httpx.Response:
    return httpx.post(server.url + path, content=body, headers={"content-type": "application/json"},
                      timeout=timeout)


def assert_error(resp: httpx.Response, status: int, param: str | None = None, contains: str = "") -> dict:
    assert resp.status_code == status, resp.text[:500]
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert contains.lower() in err["message"].lower(), err["message"]
    if param is not None:
        assert err["param"] == param, err
    return err


def healthy(server: Server) -> None:
    assert httpx.get(server.url + "/health", timeout=30).status_code == 200


@pytest.mark.parametrize("name", ["fé☃ld", "bad\r\nx-injected: 1", "nul\x00name", "é" * 5000])
@pytest.mark.parametrize("stream", [False, True])
def test_unknown_field_names_are_sanitized_in_headers(server: Server, name: str, stream: bool) -> None:
    body = {"prompt": "Hi", "max_tokens": 2, name: 1, "stream": stream}
    resp = raw_post(server, COMPLETIONS, json.dumps(body).encode())
    assert resp.status_code == 200, resp.text
    value = resp.headers["x-mixserve-ignored-fields"]
    assert value.isascii() and "\r" not in value and "\n" not in value and len(value) <= 1100
    assert "x-injected" not in resp.headers
    healthy(server)


@pytest.mark.parametrize("where", ["prompt", "unknown"])
def test_deep_nesting_is_400(server: Server, where: str) -> None:
    deep = "[" * 50_000 + "]" * 50_000
    body = f'{{"prompt": {deep}}}' if where == "prompt" else f'{{"prompt": "x", "junk": {deep}}}'
    err = assert_error(raw_post(server, COMPLETIONS, body.encode()), 400, contains="deeper")
    assert err["type"] == "invalid_request_error"
    shallow = '{"prompt": "x", "junk": ' + "[" * 100 + "]" * 100 + "}"
    assert_error(raw_post(server, COMPLETIONS, shallow.encode()), 400, param="junk", contains="deeper")
    healthy(server)


@pytest.mark.parametrize("path, body, param", [
    (COMPLETIONS, '{"prompt": "a\\ud800b", "max_tokens": 1}', "prompt"),
    (CHAT, '{"messages": [{"role": "user", "content": "\\udfff"}]}', "messages.0.content"),
    ("/tokenize", '{"prompt": "\\ud83d"}', "prompt"),
])
def test_invalid_unicode_is_400(server: Server, path: str, body: str, param: str) -> None:
    assert_error(raw_post(server, path, body.encode()), 400, param=param, contains="unicode")
    healthy(server)


@pytest.mark.parametrize("body, param", [
    ('{"prompt": "x", "max_tokens": 1, "seed": 18446744073709551616}', "seed"),
    ('{"prompt": "x", "max_tokens": 1, "seed": -9223372036854775809}', "seed"),
    ('{"prompt": "x", "max_tokens": 1, "temperature": 1e309}', "temperature"),
    ('{"prompt": "x", "max_tokens": 1, "top_p": -1e309}', "top_p"),
    ('{"prompt": "x", "max_tokens": 1, "top_k": 99999999999999999999999}', "top_k"),
    ('{"prompt": "x", "max_tokens": 1, "logit_bias": {"5": 1e400}}', "logit_bias.5"),
])
def test_numbers_out_of_range_are_400(server: Server, body: str, param: str) -> None:
    assert_error(raw_post(server, COMPLETIONS, body.encode()), 400, param=param)
    healthy(server)


@pytest.mark.parametrize("literal", ["Infinity", "NaN", "-Infinity"])
def test_non_finite_literals_are_400(server: Server, literal: str) -> None:
    body = f'{{"prompt": "x", "max_tokens": 1, "temperature": {literal}}}'
    assert_error(raw_post(server, COMPLETIONS, body.encode()), 400, contains="not valid JSON")


@pytest.mark.parametrize("seed", [0, 2**64 - 1, -(2**63)])
def test_extreme_seeds_are_accepted(server: Server, seed: int) -> None:
    resp = raw_post(server, COMPLETIONS, json.dumps({"prompt": "x", "max_tokens": 2, "seed": seed}).encode())
    assert resp.status_code == 200, resp.text
    CompletionResponse.model_validate(resp.json())


def test_truncated_body_is_a_499_not_a_500(server: Server) -> None:
    with socket.create_connection(("127.0.0.1", int(server.url.rsplit(":", 1)[1])), timeout=10) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                     b"content-length: 1000\r\n\r\n{\"prompt\": \"abc")
        time.sleep(0.5)
    time.sleep(1.0)
    text = httpx.get(server.url + "/metrics").text
    assert 'status="500"' not in text
    assert 'status="499"' in text, [line for line in text.splitlines() if "error" in line]
    assert "ERROR" not in server.log.read_text()
    healthy(server)


def test_body_over_the_limit_is_413(server: Server) -> None:
    big = b'{"prompt": "' + b"a" * (9 * 1024 * 1024) + b'"}'
    assert_error(raw_post(server, COMPLETIONS, big), 413, contains="too large")
    healthy(server)


def test_long_string_is_400_before_tokenizing(server: Server) -> None:
    body = json.dumps({"prompt": "word " * 300_000, "max_tokens": 1}).encode()
    assert_error(raw_post(server, COMPLETIONS, body), 400, param="prompt", contains="longer than")


def test_health_answers_while_a_maximal_request_is_rejected(server: Server) -> None:
    """A body just under the size limit full of tokenizable text and a huge token list: /health stays live."""
    bodies = [json.dumps({"prompt": ["word " * 190_000] * 8, "max_tokens": 1}).encode(),
              json.dumps({"prompt": [7] * 2_000_000, "max_tokens": 1}).encode()]
    results: list[httpx.Response] = []

    def hostile() -> None:
        for body in bodies:
            results.append(raw_post(server, COMPLETIONS, body, timeout=300))

    thread = threading.Thread(target=hostile)
    thread.start()
    worst = 0.0
    while thread.is_alive():
        start = time.monotonic()
        assert httpx.get(server.url + "/health", timeout=60).status_code == 200
        worst = max(worst, time.monotonic() - start)
        time.sleep(0.05)
    thread.join()
    assert [r.status_code for r in results] == [400, 400], [r.text[:200] for r in results]
    assert worst < 10.0, f"/health took {worst:.1f}s while a maximal request was processed"


def test_stream_validation_happens_before_the_stream(server: Server) -> None:
    body = {"prompt": "Hello", "n": 3, "echo": True, "logprobs": 1, "max_tokens": 3, "stream": True}
    plain = raw_post(server, COMPLETIONS, json.dumps({**body, "stream": False}).encode())
    streamed = raw_post(server, COMPLETIONS, json.dumps(body).encode())
    assert streamed.status_code == plain.status_code, (plain.text, streamed.text)
    if plain.status_code != 200:
        assert streamed.json()["error"]["param"] == plain.json()["error"]["param"]
    healthy(server)


def test_slow_headers_are_cut_off(smollm2_path: str, tmp_path) -> None:  # noqa: ANN001
    from tests.server.conftest import start_server

    srv = start_server(smollm2_path, tmp_path, "--header-timeout", "2", "--keep-alive-timeout", "1",
                       "--body-timeout", "2")
    try:
        port = int(srv.url.rsplit(":", 1)[1])
        # A body that stops arriving after the headers is a 408 in the error shape, not a hang.
        with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
            sock.sendall(b"POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                         b"content-length: 100\r\n\r\n{\"prompt\": ")
            reply = b""
            while b"\r\n\r\n" not in reply or not reply.rstrip().endswith(b"}"):
                chunk = sock.recv(4096)
                if not chunk:
                    break
                reply += chunk
        head, _, payload = reply.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 408"), reply[:300]
        assert set(json.loads(payload)["error"]) == {"message", "type", "param", "code"}
        with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
            sock.sendall(b"GET /health HTTP/1.1\r\n")
            start = time.monotonic()
            closed = False
            while time.monotonic() - start < 20:
                try:
                    sock.sendall(b"x-slow: 1\r\n")
                except OSError:
                    closed = True
                    break
                sock.settimeout(0.5)
                try:
                    if sock.recv(1024) == b"":
                        closed = True
                        break
                except TimeoutError:
                    pass
            assert closed, "a connection trickling its headers was never closed"
        healthy(srv)
    finally:
        srv.stop()


def test_openapi_documents_bodies(server: Server) -> None:
    spec = httpx.get(server.url + "/openapi.json").json()
    op = spec["paths"]["/v1/completions"]["post"]
    ref = op["requestBody"]["content"]["application/json"]["schema"]["$ref"].rsplit("/", 1)[1]
    props = spec["components"]["schemas"][ref]["properties"]
    for name in ("prompt", "max_tokens", "seed", "strategy", "budget", "verifier", "echo", "logprobs"):
        assert name in props, name
    assert props["seed"]["anyOf"][0]["maximum"] == 2**64 - 1
    ok = op["responses"]["200"]["content"]["application/json"]["schema"]["$ref"]
    assert ok.endswith("/CompletionResponse")
    for path in ("/v1/chat/completions", "/tokenize", "/detokenize", "/tokenizer_info", "/health", "/v1/models"):
        assert path in spec["paths"], path


def test_tokenizer_info_replays_lm_eval_remote_tokenizer(server: Server) -> None:
    """What lm_eval.utils.RemoteTokenizer does: /tokenizer_info, encode(eos)[0], encode/decode, echo scoring."""
    info = httpx.get(server.url + "/tokenizer_info").json()
    TokenizerInfo.model_validate(info)
    assert "eos_token" in info and info["eos_token"] and info["chat_template"]

    def encode(text: str) -> list[int]:
        resp = httpx.post(server.url + "/tokenize", json={"prompt": text, "add_special_tokens": False})
        assert resp.status_code == 200
        return resp.json()["tokens"]

    assert encode(info["eos_token"])[0] == info["eos_token_id"]
    ctx, cont = encode("The capital of France is"), encode(" Paris")
    decoded = httpx.post(server.url + "/detokenize", json={"tokens": ctx + cont}).json()["prompt"]
    assert decoded == "The capital of France is Paris"
    # local-completions' loglikelihood payload: token lists, echo, max_tokens=1, logprobs=1
    payload = {"model": MODEL_NAME, "prompt": [ctx + cont], "temperature": 0, "max_tokens": 1, "logprobs": 1,
               "seed": 1234, "echo": True}
    out = httpx.post(server.url + COMPLETIONS, json=payload, timeout=120).json()
    CompletionResponse.model_validate(out)
    choice = out["choices"][0]
    lps = choice["logprobs"]["token_logprobs"][len(ctx):-1]
    tops = choice["logprobs"]["top_logprobs"][len(ctx):-1]
    assert len(lps) == len(cont) and all(isinstance(x, float) and x <= 0 for x in lps)
    assert all(isinstance(t, dict) and t for t in tops)
