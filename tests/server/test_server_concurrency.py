"""32 streaming requests at once (different n, lengths, seeds, sampling settings) against one server.

Every request gets all its tokens, and the tokens equal those of the same requests run one at a
time: sampling is counter-based per (seed, sample index, step), so the batch a request ran in
does not change what it draws.
"""

from __future__ import annotations

import asyncio

import httpx
import openai
import pytest
from server_fixtures import ServerProcess, make_tiny_model

NUM_REQUESTS = 32


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    folder = make_tiny_model(tmp_path_factory.mktemp("tiny_concurrency"), family="llama_gqa")
    srv = ServerProcess(folder, "--max-batch", "16", "--max-prompts", "4", "--max-n", "8", "--max-prompt-len", "48",
                        "--max-tokens", "32", "--max-queue", "64")
    yield srv
    srv.stop()


def request_spec(i: int) -> dict:
    spec = {
        "prompt": f"Request {i}: " + "xyz" * (i % 4),
        "n": 1 + i % 5,
        "max_tokens": 3 + (i * 7) % 30,
        "seed": 1000 + i,
        "temperature": [1.0, 0.7, 1.3, 0.0][i % 4],
        "logprobs": 0,
    }
    if i % 3 == 1:
        spec["top_p"] = 0.9
    if i % 5 == 2:
        spec["extra_body"] = {"top_k": 20}
    return spec


async def run_streaming(client: openai.AsyncOpenAI, model: str, spec: dict) -> dict:
    tokens: dict[int, list[str]] = {i: [] for i in range(spec["n"])}
    finish: dict[int, str] = {}
    usage = None
    stream = await client.completions.create(model=model, stream=True, stream_options={"include_usage": True}, **spec)
    async for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for c in chunk.choices:
            if c.logprobs is not None:
                tokens[c.index].extend(c.logprobs.tokens)
            if c.finish_reason:
                assert c.index not in finish, "two finish chunks for one choice"
                finish[c.index] = c.finish_reason
    return {"tokens": tokens, "finish": finish, "completion_tokens": usage.completion_tokens}


async def watch_running(server: ServerProcess, stop: asyncio.Event) -> int:
    """The most engine requests seen running at once (polled from /metrics)."""
    most = 0
    async with httpx.AsyncClient(timeout=10) as http:
        while not stop.is_set():
            text = (await http.get(server.url + "/metrics")).text
            for line in text.splitlines():
                if line.startswith("forklm_requests_running "):
                    most = max(most, int(float(line.split()[1])))
            await asyncio.sleep(0.01)
    return most


async def run_all(server: ServerProcess, specs: list[dict]) -> tuple[list[dict], int]:
    client = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)
    model = (await client.models.list()).data[0].id
    stop = asyncio.Event()
    watcher = asyncio.create_task(watch_running(server, stop))
    try:
        results = await asyncio.gather(*(run_streaming(client, model, s) for s in specs))
    finally:
        stop.set()
    most_running = await watcher
    await client.close()
    return results, most_running


def test_32_concurrent_streams_equal_one_at_a_time(server):
    specs = [request_spec(i) for i in range(NUM_REQUESTS)]
    before = server.metrics()
    together, most_running = asyncio.run(run_all(server, specs))
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)
    model = client.models.list().data[0].id
    for spec, got in zip(specs, together):
        alone = client.completions.create(model=model, **spec)  # one at a time, not streamed
        expected_tokens = {c.index: c.logprobs.tokens for c in alone.choices}
        assert got["tokens"] == expected_tokens, spec
        assert got["finish"] == {c.index: c.finish_reason for c in alone.choices}, spec
        # every sample got all its tokens: max_tokens of them, or up to a stop (EOS)
        for index, toks in got["tokens"].items():
            assert got["finish"][index] in ("stop", "length")
            if got["finish"][index] == "length":
                assert len(toks) == spec["max_tokens"]
            else:
                assert len(toks) <= spec["max_tokens"]
        assert got["completion_tokens"] == sum(len(t) for t in got["tokens"].values()) == alone.usage.completion_tokens
    after = server.metrics()
    assert after["forklm_requests_submitted_total"] - before["forklm_requests_submitted_total"] == 2 * NUM_REQUESTS
    assert after["forklm_requests_finished_total"] - before["forklm_requests_finished_total"] == 2 * NUM_REQUESTS
    assert after["forklm_requests_aborted_total"] == before["forklm_requests_aborted_total"]
    assert after["forklm_requests_waiting"] == 0 and after["forklm_sample_rows_in_use"] == 0
    assert most_running > 1  # requests shared the batch
