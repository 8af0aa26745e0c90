"""Deadlines on a real server: --request-timeout ends a request that runs too long (408, or an error
event in a stream), --body-timeout answers 408 to a client that sends headers and stalls; the server
serves others meanwhile and after."""

from __future__ import annotations

import json
import socket
import time

import httpx
import pytest
from server_fixtures import ServerProcess, assert_error, make_tiny_model

LONG = {"prompt": "hello", "max_tokens": 250, "ignore_eos": True, "n": 8}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = ServerProcess(make_tiny_model(tmp_path_factory.mktemp("timeouts")), "--max-batch", "8", "--max-prompts", "2",
                        "--max-prompt-len", "32", "--max-tokens", "250", "--request-timeout", "0.3",
                        "--body-timeout", "1")
    yield srv
    srv.stop()


def test_a_request_past_the_deadline_is_a_408(server):
    r = httpx.post(server.url + "/v1/completions", json=LONG, timeout=60)
    error = assert_error(r, 408)
    assert error["code"] == "request_timeout" and "--request-timeout of 0.3 s" in error["message"]
    ok = httpx.post(server.url + "/v1/completions", json={"prompt": "hi", "max_tokens": 2}, timeout=60)
    assert ok.status_code == 200
    assert 'forklm_requests_rejected_total{reason="request_timeout"}' in httpx.get(server.url + "/metrics").text


def test_a_stream_past_the_deadline_ends_with_an_error_event(server):
    with httpx.stream("POST", server.url + "/v1/completions", json=dict(LONG, stream=True), timeout=60) as r:
        assert r.status_code == 200
        data = [line for line in r.iter_lines() if line.startswith("data: ")]
    assert data[-1] == "data: [DONE]"
    assert json.loads(data[-2][len("data: "):])["error"]["code"] == "request_timeout"
    assert len(data) > 3  # it streamed before the deadline


def test_a_stalled_body_is_a_408_and_holds_nothing(server):
    host, port = "127.0.0.1", server.port
    with socket.create_connection((host, port), timeout=10) as s:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: 100\r\n\r\n{\"prompt\": ")
        start = time.perf_counter()
        # meanwhile the server serves others
        assert httpx.post(server.url + "/v1/completions", json={"prompt": "hi", "max_tokens": 2}, timeout=10).status_code == 200
        reply = b""
        while b"}}" not in reply:  # the whole JSON error
            chunk = s.recv(65536)
            if not chunk:
                break
            reply += chunk
        reply = reply.decode()
        waited = time.perf_counter() - start
    assert reply.startswith("HTTP/1.1 408"), reply
    assert "request_timeout" in reply and waited < 10
