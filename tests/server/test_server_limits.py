"""A server with --api-key, a model without a chat template, and a queue of one.

(API key off is the default of the other test modules' servers, which take requests without one.)
"""

from __future__ import annotations

import json
import time

import httpx
import openai
import pytest
from server_fixtures import ServerProcess, assert_error, make_tiny_model

KEY = "sk-test-forklm"
MAX_BATCH = 4


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    folder = make_tiny_model(tmp_path_factory.mktemp("tiny_gpt2"), family="gpt2", chat_template=False)
    srv = ServerProcess(folder, "--api-key", KEY, "--max-batch", str(MAX_BATCH), "--max-prompts", "1",
                        "--max-prompt-len", "32", "--max-tokens", "200", "--max-queue", "1")
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def model(server):
    r = httpx.get(server.url + "/v1/models", headers={"Authorization": f"Bearer {KEY}"})
    return r.json()["data"][0]["id"]


def auth(key: str = KEY) -> dict:
    return {"Authorization": f"Bearer {key}"}


@pytest.mark.parametrize("headers", [{}, auth("wrong"), {"Authorization": KEY}, {"Authorization": "Basic abc"}],
                         ids=["missing", "wrong", "no-scheme", "basic"])
@pytest.mark.parametrize("method,path", [("GET", "/v1/models"), ("POST", "/v1/completions"),
                                         ("POST", "/v1/chat/completions")])
def test_api_key_required(server, headers, method, path):
    r = httpx.request(method, server.url + path, headers=headers, json={"prompt": "x", "max_tokens": 1})
    error = assert_error(r, 401)
    assert error["code"] == "invalid_api_key"
    assert r.headers["www-authenticate"] == "Bearer"


def test_api_key_accepted(server, model):
    client = openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0)
    assert client.completions.create(model=model, prompt="abc", max_tokens=2).usage.completion_tokens >= 1
    bad = openai.OpenAI(base_url=server.url + "/v1", api_key="nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.completions.create(model=model, prompt="abc", max_tokens=2)
    # health and metrics stay open for probes and scrapers
    assert httpx.get(server.url + "/health").status_code == 200
    assert httpx.get(server.url + "/metrics").status_code == 200


def test_chat_without_template_is_a_clear_400(server, model):
    client = openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0)
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    assert "chat template" in str(info.value)
    assert client.completions.create(model=model, prompt="abc", max_tokens=1).choices


def test_queue_full_is_429_with_retry_after(server, model):
    long = {"model": model, "prompt": "long", "max_tokens": 200, "n": MAX_BATCH, "stream": True, "ignore_eos": True}
    with httpx.Client(base_url=server.url, headers=auth(), timeout=30) as http:
        with http.stream("POST", "/v1/completions", json=long) as running:  # takes every row
            assert running.status_code == 200
            lines = running.iter_lines()
            assert next(line for line in lines if line.startswith("data: "))
            with http.stream("POST", "/v1/completions", json=long) as waiting:  # queued: the queue is full
                assert waiting.status_code == 200
                r = http.post("/v1/completions", json={"model": model, "prompt": "x", "max_tokens": 1})
                assert_error(r, 429)
                assert r.json()["error"]["code"] == "queue_full"
                assert int(r.headers["retry-after"]) >= 1
        # both streams closed: their requests are dropped and the next one runs
        deadline = time.monotonic() + 20
        while (m := server.metrics())["forklm_requests_waiting"] or m["forklm_sample_rows_in_use"]:
            assert time.monotonic() < deadline, m
            time.sleep(0.05)
        ok = http.post("/v1/completions", json={"model": model, "prompt": "x", "max_tokens": 1})
        assert ok.status_code == 200, ok.text
        assert json.loads(ok.text)["usage"]["completion_tokens"] == 1
    metrics = server.metrics()
    assert metrics['forklm_requests_rejected_total{reason="queue_full"}'] >= 1
    assert metrics["forklm_requests_aborted_total"] >= 2


def test_a_huge_prompt_is_refused_untokenized_and_the_server_keeps_serving(server, model):
    """20 MB of text (the body limit is 32 MB): refused from its length alone, at once, as a context error."""
    start = time.perf_counter()
    r = httpx.post(server.url + "/v1/completions", headers=auth(), timeout=60,
                   json={"model": model, "prompt": "ab " * (20 * 2**20 // 3), "max_tokens": 2})
    took = time.perf_counter() - start
    assert_error(r, 400, "prompt")
    assert r.json()["error"]["code"] == "context_length_exceeded" and "characters" in r.json()["error"]["message"]
    ok = httpx.post(server.url + "/v1/completions", headers=auth(), timeout=60,
                    json={"model": model, "prompt": "ab", "max_tokens": 2})
    assert ok.status_code == 200, (ok.text, took)
