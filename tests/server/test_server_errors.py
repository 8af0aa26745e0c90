"""Hostile input: every bad request gets a 4xx with OpenAI's error JSON, and the server keeps serving."""

from __future__ import annotations

import json
import socket

import httpx
import pytest
from server_fixtures import ServerProcess, assert_error, make_tiny_model

MAX_BATCH, MAX_PROMPT_LEN, MAX_TOKENS = 8, 64, 100
CMPL, CHAT = "/v1/completions", "/v1/chat/completions"
MSG = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    folder = make_tiny_model(tmp_path_factory.mktemp("tiny_errors"))
    srv = ServerProcess(folder, "--max-batch", str(MAX_BATCH), "--max-prompts", "2", "--max-prompt-len",
                        str(MAX_PROMPT_LEN), "--max-tokens", str(MAX_TOKENS), "--max-queue", "16")
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, timeout=30) as client:
        yield client


def cmpl(**fields):
    return (CMPL, {"prompt": "hello", "max_tokens": 2, **fields})


def chat(**fields):
    return (CHAT, {"messages": MSG, "max_tokens": 2, **fields})


# (id, path, JSON body or raw bytes, status, param or None)
CASES = [
    ("malformed-json", CMPL, b'{"prompt": "x",', 400, None),
    ("not-utf8", CMPL, b'{"prompt": "\xff\xfe"}', 400, None),
    ("empty-body", CMPL, b"", 400, None),
    ("body-is-a-list", CMPL, b"[1, 2]", 400, None),
    ("body-is-a-string", CHAT, b'"hello"', 400, None),
    ("lone-surrogate-prompt", CMPL, b'{"prompt": "a\\ud800b"}', 400, "prompt"),
    ("lone-surrogate-message", CHAT, b'{"messages": [{"role": "user", "content": "\\udfff"}]}', 400, "messages"),
    ("deeply-nested", CMPL, b'{"prompt": ' + b"[" * 5000 + b"]" * 5000 + b"}", 400, None),
    ("missing-prompt", CMPL, {"max_tokens": 2}, 400, "prompt"),
    ("missing-messages", CHAT, {"max_tokens": 2}, 400, "messages"),
    ("prompt-wrong-type", *cmpl(prompt=123), 400, "prompt"),
    ("prompt-mixed-list", *cmpl(prompt=[1, "a"]), 400, "prompt"),
    ("n-string", *cmpl(n="2"), 400, "n"),
    ("n-float", *cmpl(n=2.5), 400, "n"),
    ("n-bool", *cmpl(n=True), 400, "n"),
    ("temperature-string", *cmpl(temperature="hot"), 400, "temperature"),
    ("stream-string", *cmpl(stream="yes"), 400, "stream"),
    ("stop-number", *cmpl(stop=5), 400, "stop"),
    ("messages-string", *chat(messages="hi"), 400, "messages"),
    ("messages-empty", *chat(messages=[]), 400, "messages"),
    ("message-role-empty", *chat(messages=[{"role": "", "content": "a"}]), 400, "messages"),
    ("message-role-bogus", *chat(messages=[{"role": "bogus", "content": "a"}]), 400, "messages"),
    ("message-content-number", *chat(messages=[{"role": "user", "content": 5}]), 400, "messages"),
    ("message-image-part", *chat(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]),
     400, "messages"),
    ("message-content-null-in-template", *chat(messages=[{"role": "user", "content": "a"},
                                                        {"role": "assistant", "content": None}]), 400, "messages"),
    ("message-without-content", *chat(messages=[{"role": "user"}]), 400, "messages"),
    ("unknown-model", *cmpl(model="gpt-17"), 404, "model"),
    ("unknown-model-chat", *chat(model="gpt-17"), 404, "model"),
    ("n-zero", *cmpl(n=0), 400, "n"),
    ("n-negative", *cmpl(n=-3), 400, "n"),
    ("n-too-large-for-cache", *cmpl(n=1000), 400, "n"),
    ("n-huge", *cmpl(n=10**30), 400, "n"),
    ("best_of-below-n", *cmpl(n=3, best_of=2), 400, "best_of"),
    ("best_of-too-large", *cmpl(best_of=MAX_BATCH + 1), 400, "n"),
    ("best_of-stream", *cmpl(n=1, best_of=2, stream=True), 400, "best_of"),
    ("max_tokens-zero", *cmpl(max_tokens=0), 400, "max_tokens"),
    ("max_tokens-negative", *cmpl(max_tokens=-5), 400, "max_tokens"),
    ("max_tokens-over-server-limit", *cmpl(max_tokens=MAX_TOKENS + 1), 400, "max_tokens"),
    ("prompt-plus-max_tokens-over-context", *cmpl(prompt="x" * 60, max_tokens=200), 400, "max_tokens"),
    ("prompt-over-max-prompt-len", *cmpl(prompt="x" * (MAX_PROMPT_LEN + 1)), 400, "prompt"),
    ("chat-over-max_tokens", *chat(max_tokens=10**9), 400, "max_tokens"),
    ("chat-max_completion_tokens", *chat(max_tokens=None, max_completion_tokens=MAX_TOKENS + 1), 400, "max_tokens"),
    ("temperature-negative", *cmpl(temperature=-1), 400, "temperature"),
    ("top_p-zero", *cmpl(top_p=0), 400, "top_p"),
    ("top_p-above-one", *cmpl(top_p=1.5), 400, "top_p"),
    ("top_k-negative", *cmpl(top_k=-5), 400, "top_k"),
    ("min_p-above-one", *cmpl(min_p=2.0), 400, "min_p"),
    ("presence_penalty", *cmpl(presence_penalty=5), 400, "presence_penalty"),
    ("frequency_penalty", *cmpl(frequency_penalty=-3), 400, "frequency_penalty"),
    ("repetition_penalty-zero", *cmpl(repetition_penalty=0), 400, "repetition_penalty"),
    ("logprobs-too-many", *cmpl(logprobs=50), 400, "logprobs"),
    ("logprobs-negative", *cmpl(logprobs=-1), 400, "logprobs"),
    ("top_logprobs-too-many", *chat(logprobs=True, top_logprobs=30), 400, "top_logprobs"),
    ("top_logprobs-without-logprobs", *chat(top_logprobs=2), 400, "top_logprobs"),
    ("logit_bias-token-outside-vocab", *cmpl(logit_bias={"99999": 1}), 400, "logit_bias"),
    ("logit_bias-value", *cmpl(logit_bias={"5": 500}), 400, "logit_bias"),
    ("logit_bias-key", *cmpl(logit_bias={"abc": 1}), 400, "logit_bias"),
    ("stop_token_ids-outside-vocab", *cmpl(stop_token_ids=[9999]), 400, "stop_token_ids"),
    ("stop-empty-string", *cmpl(stop=[""]), 400, "stop"),
    ("min_tokens-above-max", *cmpl(min_tokens=5, max_tokens=2), 400, "min_tokens"),
    ("prompt-token-outside-vocab", *cmpl(prompt=[[999]]), 400, "prompt_token_ids"),
    ("prompt-token-negative", *cmpl(prompt=[-1, 5]), 400, "prompt_token_ids"),
    ("prompt-empty-string", *cmpl(prompt=""), 400, "prompt"),
    ("prompt-empty-list", *cmpl(prompt=[]), 400, "prompt"),
    ("prompt-empty-token-list", *cmpl(prompt=[[]]), 400, "prompt"),
    ("too-many-prompts-for-queue", *cmpl(prompt=["a"] * 17), 400, "prompt"),  # never fits: not a 429
    ("no_repeat_ngram_size-huge", *cmpl(no_repeat_ngram_size=2**31), 400, "no_repeat_ngram_size"),
    ("no_repeat_ngram_size-overflow", *cmpl(no_repeat_ngram_size=10**20), 400, "no_repeat_ngram_size"),
    ("suffix", *cmpl(suffix="tail"), 400, "suffix"),
]


def post(http: httpx.Client, path: str, body) -> httpx.Response:
    if isinstance(body, bytes):
        return http.post(path, content=body, headers={"Content-Type": "application/json"})
    return http.post(path, json=body)


def good_request_works(http: httpx.Client) -> None:
    r = http.post(CMPL, json={"prompt": "ok", "max_tokens": 1})
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] == 1


@pytest.mark.parametrize("path,body,status,param", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_request(http, path, body, status, param):
    error = assert_error(post(http, path, body), status, param)
    if status == 429:
        assert error["code"] == "queue_full"
    good_request_works(http)


EXTREME_BUT_VALID = [
    {"temperature": 1e-4}, {"temperature": 1e300}, {"top_p": 1e-300}, {"top_k": 10**20}, {"seed": 10**30},
    {"seed": -5}, {"repetition_penalty": 1e4}, {"repetition_penalty": 1e-4}, {"min_p": 1.0},
    {"logit_bias": {"5": 100, "6": -100}}, {"stop": ["a"] * 32}, {"prompt": "\x00\ud7ff"}, {"user": "u" * 10000},
    {"best_of": MAX_BATCH, "n": MAX_BATCH, "logprobs": 20}, {"no_repeat_ngram_size": 2},
]
# past the stated limits (float32 would overflow, or the lists are longer than allowed): 400s naming them
EXTREME_REFUSED = [
    ({"temperature": 1e-300}, "temperature", "0.0001"), ({"repetition_penalty": 1e300}, "repetition_penalty", "10000"),
    ({"repetition_penalty": 1e-300}, "repetition_penalty", "0.0001"), ({"stop": ["a"] * 200}, "stop", "32"),
    ({"stop": ["a" * 2000]}, "stop", "1024"), ({"logit_bias": {str(i): 1 for i in range(1100)}}, "logit_bias", "1024"),
    ({"stop_token_ids": [1] * 1100}, "stop_token_ids", "1024"), ({"n": 5000}, "n", "4096"),
]


@pytest.mark.parametrize("fields, param, limit", EXTREME_REFUSED, ids=[",".join(f[0]) + str(i) for i, f in enumerate(EXTREME_REFUSED)])
def test_values_past_the_stated_limits_are_400s_naming_them(http, fields, param, limit):
    r = post(http, *cmpl(**fields))
    error = assert_error(r, 400, param)
    assert limit in error["message"], error


@pytest.mark.parametrize("fields", EXTREME_BUT_VALID, ids=[",".join(f) for f in EXTREME_BUT_VALID])
def test_extreme_but_valid_values_are_served(http, fields):
    r = post(http, *cmpl(**fields))
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] >= 1


def test_capacity_error_names_largest_n(http):
    error = assert_error(post(http, *cmpl(n=1000)), 400, "n")
    assert f"at most {MAX_BATCH}" in error["message"]
    assert error["code"] == "capacity_exceeded"


def test_context_length_error_code(http):
    error = assert_error(post(http, *cmpl(prompt="x" * 60, max_tokens=200)), 400, "max_tokens")
    assert error["code"] == "context_length_exceeded"
    assert "256" in error["message"]


def test_routes_methods_and_bodies(server, http):
    assert_error(http.get("/v1/nothing"), 404)
    assert_error(http.get(CMPL), 405)
    assert_error(http.post(CMPL, content=b'{"prompt": "x"}', headers={"Content-Type": "text/plain"}), 400)
    # a body over the limit is refused from its Content-Length, before it is read
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as s:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: 999999999\r\n\r\n{")
        reply = b""
        while b"\r\n\r\n" not in reply or len(reply.partition(b"\r\n\r\n")[2]) < _content_length(reply):
            data = s.recv(65536)
            if not data:
                break
            reply += data
    head, _, body = reply.decode().partition("\r\n\r\n")
    assert head.startswith("HTTP/1.1 413")
    assert json.loads(body)["error"]["code"] == "request_too_large"
    good_request_works(http)


def _content_length(reply: bytes) -> int:
    for line in reply.partition(b"\r\n\r\n")[0].split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            return int(line.split(b":", 1)[1])
    return 0


def test_no_500_and_metrics_count_errors(server, http):
    metrics = server.metrics()
    assert not any('status="500"' in k for k in metrics)
    assert metrics['forklm_http_requests_total{path="/v1/completions",status="400"}'] > 10
    assert metrics["forklm_engine_errors_total"] == 0
    assert metrics["forklm_requests_waiting"] == 0 and metrics["forklm_sample_rows_in_use"] == 0
