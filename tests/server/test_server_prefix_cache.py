"""Prefix sharing through the server: 16 concurrent n=1 requests with one prompt (as RL frameworks
send them) equal the same requests one at a time, share the prompt's K/V, and report it in usage."""

from __future__ import annotations

import asyncio

import openai
import pytest
from server_fixtures import ServerProcess, make_tiny_model

PROMPT = "The shared prompt of every rollout in this group: " + "abc " * 12


@pytest.fixture(scope="module", params=["on", "off"])
def server(request, tmp_path_factory):
    folder = make_tiny_model(tmp_path_factory.mktemp("tiny_prefix"), family="llama_gqa")
    flags = ["--max-batch", "16", "--max-tokens", "16", "--prefill-chunk-tokens", "16"]
    if request.param == "off":
        flags.append("--no-prefix-caching")
    srv = ServerProcess(folder, *flags)
    srv.caching = request.param == "on"
    yield srv
    srv.stop()


async def _one(client, model, seed, stream):
    kw = dict(model=model, prompt=PROMPT, max_tokens=10, temperature=1.0, seed=seed, logprobs=0)
    if not stream:
        r = await client.completions.create(**kw)
        return r.choices[0].logprobs.tokens, r.usage.prompt_tokens_details.cached_tokens
    tokens, cached = [], None
    async for chunk in await client.completions.create(stream=True, stream_options={"include_usage": True}, **kw):
        if chunk.usage is not None:
            cached = chunk.usage.prompt_tokens_details.cached_tokens
        for c in chunk.choices:
            if c.logprobs is not None:
                tokens.extend(c.logprobs.tokens)
    return tokens, cached


async def _together(url, model):
    async with openai.AsyncOpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120) as client:
        return await asyncio.gather(*(_one(client, model, seed, stream=seed % 2 == 0) for seed in range(16)))


def test_16_concurrent_n1_requests_equal_one_at_a_time(server):
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)
    model = client.models.list().data[0].id
    before = server.metrics().get("forklm_prefix_cache_hit_tokens_total", 0)
    together = asyncio.run(_together(server.url, model))
    alone = [client.completions.create(model=model, prompt=PROMPT, max_tokens=10, temperature=1.0, seed=s,
                                       logprobs=0) for s in range(16)]
    assert [t for t, _ in together] == [a.choices[0].logprobs.tokens for a in alone]
    prompt_tokens = alone[0].usage.prompt_tokens
    metrics = server.metrics()
    if server.caching:
        # the prompt was computed once: every other request reused all of it
        assert sum(c == prompt_tokens for _, c in together) >= 15
        assert all(a.usage.prompt_tokens_details.cached_tokens == prompt_tokens for a in alone)
        assert metrics["forklm_prefix_cache_hit_tokens_total"] - before >= 30 * prompt_tokens
        assert 0 < metrics["forklm_kv_cache_usage"] <= 1
    else:
        assert all(c == 0 for _, c in together)
        assert metrics["forklm_prefix_cache_hit_tokens_total"] == 0
