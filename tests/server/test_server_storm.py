"""A storm: 60 streamed requests at once against one server, a third of them hanging up mid-stream.

Mixed n (1..3) and max_tokens (4..12), ignore_eos, distinct seeds; --max-queue is small enough that
some of the 60 may be refused with 429 (how many depends on how the arrivals interleave with the
engine's steps). Every answer is a 200 or a 429 with Retry-After; every stream read to the end has
all its n x max_tokens tokens and a usage that counts them; once the storm is over the engine's
running and waiting gauges return to 0, every accepted engine request is accounted for (finished or
aborted), a seeded request gives the same text as before the storm and the server is healthy.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field

import httpx
import pytest
from server_fixtures import ServerProcess, make_tiny_model

NUM_CLIENTS = 60
MAX_QUEUE = 32
SEEDED = {"prompt": "Seeded: ", "n": 2, "max_tokens": 12, "temperature": 0.8, "seed": 123, "ignore_eos": True}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    folder = make_tiny_model(tmp_path_factory.mktemp("tiny_storm"), family="llama_gqa")
    srv = ServerProcess(folder, "--max-batch", "16", "--max-prompts", "8", "--max-n", "4", "--max-prompt-len", "48",
                        "--max-tokens", "16", "--max-queue", str(MAX_QUEUE))
    yield srv
    srv.stop()


@dataclass
class Client:
    index: int
    n: int
    max_tokens: int
    seed: int
    hang_up_after: int | None  # close the stream once this many tokens came (None: read it all)
    status: int | None = None
    retry_after: str | None = None
    refusal: dict | None = None
    tokens: dict[int, list[str]] = field(default_factory=dict)
    finish: dict[int, str] = field(default_factory=dict)
    usage: int | None = None
    done: bool = False
    hung_up: bool = False
    errors: list[str] = field(default_factory=list)

    @property
    def count(self) -> int:
        return sum(len(t) for t in self.tokens.values())


def make_clients() -> list[Client]:
    clients = []
    for i in range(NUM_CLIENTS):
        n, max_tokens = 1 + i % 3, 4 + (i * 5) % 9
        hang_up = max(1, n * max_tokens // 2) if i % 3 == 2 else None  # mid-stream: fewer than n x max_tokens
        clients.append(Client(i, n, max_tokens, 1000 + i, hang_up))
    return clients


async def stream(http: httpx.AsyncClient, model: str, c: Client) -> None:
    body = {"model": model, "prompt": f"Storm {c.index % 7}: " + "ab" * (c.index % 5), "n": c.n,
            "max_tokens": c.max_tokens, "seed": c.seed, "temperature": 1.0, "ignore_eos": True, "logprobs": 0,
            "stream": True, "stream_options": {"include_usage": True}}
    async with http.stream("POST", "/v1/completions", json=body) as r:
        c.status = r.status_code
        if r.status_code != 200:
            c.retry_after = r.headers.get("retry-after")
            c.refusal = json.loads(await r.aread())
            return
        async for line in r.aiter_lines():
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                c.done = True
                break
            chunk = json.loads(line[6:])
            if "error" in chunk:
                c.errors.append(chunk["error"]["message"])
                continue
            if chunk.get("usage"):
                c.usage = chunk["usage"]["completion_tokens"]
            for choice in chunk["choices"]:
                c.tokens.setdefault(choice["index"], []).extend((choice.get("logprobs") or {}).get("tokens") or [])
                if choice.get("finish_reason"):
                    assert choice["index"] not in c.finish, "two finish chunks for one choice"
                    c.finish[choice["index"]] = choice["finish_reason"]
            if c.hang_up_after is not None and c.count >= c.hang_up_after:
                c.hung_up = True
                break  # leaving `async with` closes the half-read response: the connection drops


async def storm(server: ServerProcess, model: str, clients: list[Client]) -> None:
    limits = httpx.Limits(max_connections=NUM_CLIENTS + 4, max_keepalive_connections=NUM_CLIENTS + 4)
    async with httpx.AsyncClient(base_url=server.url, timeout=60, limits=limits) as http:
        await asyncio.gather(*(stream(http, model, c) for c in clients))


def seeded(server: ServerProcess, model: str) -> list[str]:
    r = httpx.post(server.url + "/v1/completions", json={"model": model, **SEEDED}, timeout=60)
    assert r.status_code == 200, r.text
    return [c["text"] for c in sorted(r.json()["choices"], key=lambda c: c["index"])]


def test_storm_of_60_streams_with_hang_ups(server):
    model = httpx.get(server.url + "/v1/models").json()["data"][0]["id"]
    seeded_before = seeded(server, model)
    assert all(len(t) == SEEDED["max_tokens"] for t in seeded_before)  # one character per token
    before = server.metrics()

    clients = make_clients()
    asyncio.run(storm(server, model, clients))

    statuses = [c.status for c in clients]
    assert set(statuses) <= {200, 429}, statuses
    for c in clients:
        assert not c.errors, (c.index, c.errors)
        if c.status == 429:
            assert c.retry_after, c.index  # Retry-After present
            assert c.refusal["error"]["code"] == "queue_full", c.refusal
    completed = [c for c in clients if c.status == 200 and not c.hung_up]
    hung_up = [c for c in clients if c.status == 200 and c.hung_up]
    print(f"storm: {len(completed)} completed, {len(hung_up)} hung up, {statuses.count(429)} refused (429)")
    assert completed and hung_up, statuses
    for c in completed:
        spec = (c.index, c.n, c.max_tokens)
        assert c.done, spec
        assert sorted(c.tokens) == list(range(c.n)), (spec, sorted(c.tokens))
        assert all(len(t) == c.max_tokens for t in c.tokens.values()), (spec, {i: len(t) for i, t in c.tokens.items()})
        assert c.finish == {i: "length" for i in range(c.n)}, (spec, c.finish)
        assert c.usage == c.count == c.n * c.max_tokens, (spec, c.usage, c.count)
    for c in hung_up:
        assert c.hang_up_after <= c.count < c.n * c.max_tokens, (c.index, c.count)

    # the engine drains: nothing running, nothing waiting, no rows held
    deadline = time.monotonic() + 10
    while True:
        after = server.metrics()
        if after["forklm_requests_running"] == 0 and after["forklm_requests_waiting"] == 0:
            break
        assert time.monotonic() < deadline, {k: after[k] for k in ("forklm_requests_running",
                                                                   "forklm_requests_waiting")}
        time.sleep(0.1)
    assert after["forklm_sample_rows_in_use"] == 0
    delta = {k: after[k] - before[k] for k in ("forklm_requests_submitted_total", "forklm_requests_finished_total",
                                               "forklm_requests_aborted_total")}
    accepted = sum(1 for s in statuses if s == 200)
    assert delta["forklm_requests_submitted_total"] == accepted, delta
    # every accepted request finished or was aborted (a hung-up one may finish before the server sees it go)
    assert delta["forklm_requests_finished_total"] + delta["forklm_requests_aborted_total"] == accepted, delta
    assert delta["forklm_requests_finished_total"] >= len(completed), delta
    refused = after.get('forklm_requests_rejected_total{reason="queue_full"}', 0.0) - before.get(
        'forklm_requests_rejected_total{reason="queue_full"}', 0.0)
    assert refused == statuses.count(429)

    assert seeded(server, model) == seeded_before
    assert httpx.get(server.url + "/health").status_code == 200
