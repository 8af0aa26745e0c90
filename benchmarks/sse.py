"""The JSON chunks of a streamed OpenAI-style response, for the benchmark clients."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import httpx


class StreamRefused(Exception):
    """The server answered the streamed request with a status other than 200."""


async def chunks(client: httpx.AsyncClient, path: str, body: dict) -> AsyncIterator[dict]:
    """Each `data:` chunk of `POST path` as a dict (until `[DONE]`); StreamRefused on a non-200 answer."""
    async with client.stream("POST", path, json=body) as r:
        if r.status_code != 200:
            raise StreamRefused(f"{r.status_code}: {(await r.aread()).decode()[:300]}")
        async for line in r.aiter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                yield json.loads(line[6:])
