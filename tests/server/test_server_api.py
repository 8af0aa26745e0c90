"""The real `openai` client against a real `forklm serve` process on a tiny random model.

Completions and chat, n > 1, streaming with n > 1, logprobs, stop, echo, seeds, a long request
that does not block a short one, and a client that disconnects mid-stream.
"""

from __future__ import annotations

import threading
import time

import httpx
import openai
import pytest
from server_fixtures import ServerProcess, char_vocab, make_tiny_model

from forklm.tokenizer import Tokenizer

MAX_BATCH, MAX_TOKENS = 16, 200


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("tiny_chat"))


@pytest.fixture(scope="module")
def server(model_dir):
    srv = ServerProcess(model_dir, "--max-batch", str(MAX_BATCH), "--max-prompts", "4", "--max-prompt-len", "64",
                        "--max-tokens", str(MAX_TOKENS), "--max-queue", "64")
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def model(client):
    return client.models.list().data[0].id


def test_models_and_health(server, client, model_dir):
    models = client.models.list().data
    assert [m.id for m in models] == [str(model_dir)]
    assert httpx.get(server.url + "/health").json() == {"status": "ok"}
    assert client.models.retrieve(str(model_dir)).id == str(model_dir)


def test_completion_n_usage_and_seed(client, model):
    kwargs = dict(model=model, prompt="Hello", max_tokens=6, n=3, seed=7, logprobs=0)
    a = client.completions.create(**kwargs)
    assert [c.index for c in a.choices] == [0, 1, 2]
    tokens = [len(c.logprobs.tokens) for c in a.choices]
    assert all(1 <= t <= 6 for t in tokens)
    for c, t in zip(a.choices, tokens):
        assert c.finish_reason == ("length" if t == 6 else "stop")
    assert a.usage.prompt_tokens == 5  # one token per character
    assert a.usage.completion_tokens == sum(tokens)
    assert a.usage.total_tokens == 5 + sum(tokens)
    b = client.completions.create(**kwargs)
    assert [c.text for c in b.choices] == [c.text for c in a.choices]
    assert [c.logprobs.tokens for c in b.choices] == [c.logprobs.tokens for c in a.choices]
    other = client.completions.create(**dict(kwargs, seed=8))
    assert [c.logprobs.tokens for c in other.choices] != [c.logprobs.tokens for c in a.choices]
    assert len({tuple(c.logprobs.tokens) for c in a.choices}) > 1  # the n samples differ


def test_chat_n(client, model, model_dir):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]
    r = client.chat.completions.create(model=model, messages=messages, n=2, max_tokens=5, seed=3)
    assert len(r.choices) == 2
    for c in r.choices:
        assert c.message.role == "assistant" and isinstance(c.message.content, str)
        assert c.finish_reason in ("stop", "length")
    tok = Tokenizer.from_dir(model_dir)
    rendered = tok.apply_chat_template(messages, add_generation_prompt=True)
    assert r.usage.prompt_tokens == len(tok.encode(rendered, add_special_tokens=False))
    # list-of-parts content renders like the plain string
    parts = [{"role": "system", "content": "Be brief."},
             {"role": "user", "content": [{"type": "text", "text": "Hi there"}]}]
    r2 = client.chat.completions.create(model=model, messages=parts, n=2, max_tokens=5, seed=3)
    assert [c.message.content for c in r2.choices] == [c.message.content for c in r.choices]


def test_completion_stream_n_matches_non_stream(client, model):
    kwargs = dict(model=model, prompt=["Once upon", "A"], max_tokens=8, n=3, seed=11)
    full = client.completions.create(**kwargs)
    texts: dict[int, str] = {}
    finish: dict[int, str] = {}
    usage = None
    order = []
    for chunk in client.completions.create(**kwargs, stream=True, stream_options={"include_usage": True}):
        if chunk.usage is not None:
            usage = chunk.usage
            assert chunk.choices == []
            continue
        (c,) = chunk.choices
        order.append(c.index)
        texts[c.index] = texts.get(c.index, "") + c.text
        if c.finish_reason:
            finish[c.index] = c.finish_reason
    assert sorted(texts) == list(range(6))  # 2 prompts x n=3, numbered prompt_index * n + i
    assert len(set(order[:6])) > 1  # choices interleave
    assert [texts[i] for i in range(6)] == [c.text for c in full.choices]
    assert [finish[i] for i in range(6)] == [c.finish_reason for c in full.choices]
    assert usage is not None and usage.completion_tokens == full.usage.completion_tokens
    assert usage.prompt_tokens == full.usage.prompt_tokens == len("Once upon") + 1


def test_chat_stream_n(client, model):
    kwargs = dict(model=model, messages=[{"role": "user", "content": "Tell me"}], n=2, max_tokens=6, seed=5)
    full = client.chat.completions.create(**kwargs)
    content: dict[int, str] = {0: "", 1: ""}
    roles, finish, usage = set(), {}, None
    for chunk in client.chat.completions.create(**kwargs, stream=True, stream_options={"include_usage": True}):
        if chunk.usage is not None:
            usage = chunk.usage
            continue
        for c in chunk.choices:
            if c.delta.role:
                roles.add(c.index)
            content[c.index] += c.delta.content or ""
            if c.finish_reason:
                finish[c.index] = c.finish_reason
    assert roles == {0, 1}
    assert [content[0], content[1]] == [c.message.content for c in full.choices]
    assert finish == {c.index: c.finish_reason for c in full.choices}
    assert usage.completion_tokens == full.usage.completion_tokens


def test_logprobs(client, model):
    r = client.completions.create(model=model, prompt="abc", max_tokens=4, logprobs=3, seed=1, temperature=0.7)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset)
    assert "".join(t for t in lp.tokens if t != "</s>") == r.choices[0].text
    for value, top in zip(lp.token_logprobs, lp.top_logprobs):
        assert value <= 0 and len(top) == 3 and all(v <= 0 for v in top.values())
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(len(lp.tokens))]
    c = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "x"}], max_tokens=3,
                                       logprobs=True, top_logprobs=2, seed=1)
    content = c.choices[0].logprobs.content
    assert 1 <= len(content) <= 3
    for entry in content:
        assert entry.logprob <= 0 and len(entry.top_logprobs) == 2
        assert entry.bytes == list(entry.token.encode())
        # the top alternatives are sorted and the chosen token is no likelier than the best
        assert entry.top_logprobs[0].logprob >= entry.top_logprobs[1].logprob >= -9999
        assert entry.logprob <= entry.top_logprobs[0].logprob + 1e-5
    # greedy: the chosen token is the most likely one
    g = client.completions.create(model=model, prompt="abc", max_tokens=3, logprobs=1, temperature=0,
                                  extra_body={"ignore_eos": True})
    lp = g.choices[0].logprobs
    assert [list(t) for t in lp.top_logprobs] == [[tok] for tok in lp.tokens]


def test_stop_strings_and_tokens(client, model):
    base = dict(model=model, prompt="The stop test", temperature=0, max_tokens=12, extra_body={"ignore_eos": True})
    text = client.completions.create(**base).choices[0].text
    assert len(text) == 12
    stop = text[5:7]
    cut = text.index(stop)
    r = client.completions.create(**base, stop=[stop, "never-there"])
    assert r.choices[0].text == text[:cut]
    assert r.choices[0].finish_reason == "stop"
    streamed = "".join(c.choices[0].text for c in client.completions.create(**base, stop=stop, stream=True))
    assert streamed == text[:cut]
    stop_id = char_vocab()[text[3]]
    r = client.completions.create(**dict(base, extra_body={"ignore_eos": True, "stop_token_ids": [stop_id]}))
    assert r.choices[0].finish_reason == "stop"
    assert r.choices[0].text == text[: text.index(text[3])]


def test_echo_token_prompts_and_best_of(client, model):
    r = client.completions.create(model=model, prompt="Hi!", max_tokens=3, echo=True, logprobs=1, seed=2,
                                  extra_body={"ignore_eos": True})
    c = r.choices[0]
    assert c.text.startswith("Hi!") and len(c.text) == 6
    assert c.logprobs.tokens[:3] == ["H", "i", "!"]
    assert c.logprobs.token_logprobs[0] is None and all(v <= 0 for v in c.logprobs.token_logprobs[1:])
    ids = client.completions.create(model=model, prompt=[[45, 74, 81], [5, 6]], max_tokens=2, n=2, seed=4)
    assert [ch.index for ch in ids.choices] == [0, 1, 2, 3]
    assert ids.usage.prompt_tokens == 5
    best = client.completions.create(model=model, prompt="best", max_tokens=4, n=2, best_of=4, seed=9, logprobs=0)
    assert len(best.choices) == 2
    sums = [sum(ch.logprobs.token_logprobs) for ch in best.choices]
    assert sums[0] >= sums[1] - 1e-4


def test_long_request_does_not_block_short_ones(server, client, model):
    done = {}

    def long_stream():
        for _ in client.completions.create(model=model, prompt="long", max_tokens=MAX_TOKENS, n=4, stream=True,
                                           extra_body={"ignore_eos": True}):
            pass
        done["long"] = time.monotonic()

    thread = threading.Thread(target=long_stream)
    thread.start()
    time.sleep(0.3)
    r = client.completions.create(model=model, prompt="short", max_tokens=2, extra_body={"ignore_eos": True})
    done["short"] = time.monotonic()
    thread.join(120)
    assert r.usage.completion_tokens == 2
    assert done["short"] < done["long"]


def test_disconnect_frees_the_batch(server, client, model):
    before = server.metrics()
    body = {"model": model, "prompt": "a long one", "max_tokens": MAX_TOKENS, "n": MAX_BATCH, "stream": True,
            "ignore_eos": True}
    chunks = 0
    with httpx.Client(timeout=30) as http:
        with http.stream("POST", server.url + "/v1/completions", json=body) as response:
            assert response.status_code == 200
            for line in response.iter_lines():
                if line.startswith("data: "):
                    chunks += 1
                if chunks >= 3:
                    break  # leaving the block closes the connection mid-stream
    deadline = time.monotonic() + 20
    while True:
        m = server.metrics()
        if m["forklm_requests_aborted_total"] > before["forklm_requests_aborted_total"] and \
                m["forklm_sample_rows_in_use"] == 0 and m["forklm_requests_running"] == 0:
            break
        assert time.monotonic() < deadline, m
        time.sleep(0.05)
    generated = m["forklm_generation_tokens_total"] - before["forklm_generation_tokens_total"]
    assert generated < MAX_BATCH * MAX_TOKENS  # it was stopped, not run to the end
    # the whole batch is free again: a request needing every row runs
    r = client.completions.create(model=model, prompt="next", max_tokens=3, n=MAX_BATCH,
                                  extra_body={"ignore_eos": True})
    assert len(r.choices) == MAX_BATCH and r.usage.completion_tokens == 3 * MAX_BATCH
    # an openai-client stream closed early is dropped too
    aborted = server.metrics()["forklm_requests_aborted_total"]
    stream = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "go"}], n=MAX_BATCH,
                                            max_tokens=MAX_TOKENS, stream=True, extra_body={"ignore_eos": True})
    for i, _ in enumerate(stream):
        if i == 4:
            break
    stream.close()
    deadline = time.monotonic() + 20
    while server.metrics()["forklm_requests_aborted_total"] == aborted:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert client.completions.create(model=model, prompt="ok", max_tokens=1).choices[0].finish_reason


def test_disconnect_non_streaming(server, model):
    before = server.metrics()
    body = {"model": model, "prompt": "wait for me", "max_tokens": MAX_TOKENS, "n": MAX_BATCH, "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.url + "/v1/completions", json=body, timeout=0.2)  # the client gives up
    deadline = time.monotonic() + 20
    while (m := server.metrics())["forklm_requests_aborted_total"] == before["forklm_requests_aborted_total"]:
        assert time.monotonic() < deadline, m
        time.sleep(0.05)
    assert m["forklm_generation_tokens_total"] - before["forklm_generation_tokens_total"] < MAX_BATCH * MAX_TOKENS
    assert httpx.post(server.url + "/v1/completions", json={"prompt": "ok", "max_tokens": 1}).status_code == 200
