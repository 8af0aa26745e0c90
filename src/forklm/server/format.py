"""Engine outputs -> OpenAI's JSON: response bodies, stream chunks, usage, log probs.

Pure functions of engine results (`RequestOutput`, `SampleDelta`, `Logprob` entries); no I/O.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Sequence

from ..outputs import Logprob

#: OpenAI's floor for a log prob that is -inf (JSON has no infinity).
MIN_LOGPROB = -9999.0

# one (token id, {token id: Logprob} or None) per token; None: no log probs (the first prompt token)
TokenEntries = Sequence[tuple[int, dict[int, Logprob] | None]]


def now() -> int:
    return int(time.time())


def sse(payload: dict) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


DONE = "data: [DONE]\n\n"


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> dict:
    """OpenAI's usage, with the prompt tokens served from the prefix cache (prompt_tokens_details)."""
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens}}


def _clean(logprob: float) -> float:
    return logprob if math.isfinite(logprob) else MIN_LOGPROB


def _token_text(token_id: int, lp: Logprob | None, decode: Callable[[int], str]) -> str:
    if lp is not None and lp.decoded_token is not None:
        return lp.decoded_token
    return decode(token_id)


def _top(entry: dict[int, Logprob], k: int) -> list[tuple[int, Logprob]]:
    """The k most likely alternatives of one position (the chosen token among them if it is)."""
    return sorted(entry.items(), key=lambda item: -item[1].logprob)[:k] if k > 0 else []


def completion_logprobs(entries: TokenEntries, k: int, decode: Callable[[int], str], offset: int = 0) -> dict:
    """The legacy completions `logprobs` object: tokens, token_logprobs, top_logprobs, text_offset."""
    tokens, token_logprobs, top_logprobs, text_offset = [], [], [], []
    for token_id, entry in entries:
        chosen = entry.get(token_id) if entry else None
        text = _token_text(token_id, chosen, decode)
        tokens.append(text)
        token_logprobs.append(None if chosen is None else _clean(chosen.logprob))
        top_logprobs.append(
            None if entry is None else {_token_text(t, lp, decode): _clean(lp.logprob) for t, lp in _top(entry, k)}
        )
        text_offset.append(offset)
        offset += len(text)
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top_logprobs,
            "text_offset": text_offset}


def chat_logprobs(entries: TokenEntries, k: int, decode: Callable[[int], str]) -> dict:
    """The chat `logprobs` object: {"content": [{token, logprob, bytes, top_logprobs}]}."""
    content = []
    for token_id, entry in entries:
        entry = entry or {}
        chosen = entry.get(token_id)
        text = _token_text(token_id, chosen, decode)
        content.append({
            "token": text,
            "logprob": MIN_LOGPROB if chosen is None else _clean(chosen.logprob),
            "bytes": list(text.encode("utf-8")),
            "top_logprobs": [
                {"token": (t_text := _token_text(t, lp, decode)), "logprob": _clean(lp.logprob),
                 "bytes": list(t_text.encode("utf-8"))}
                for t, lp in _top(entry, k)
            ],
        })
    return {"content": content}


# ---- /v1/completions ------------------------------------------------------------------------------
def completion_choice(index: int, text: str, logprobs: dict | None, finish_reason: str | None,
                      stop_reason: int | str | None = None) -> dict:
    return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason,
            "stop_reason": stop_reason}


def completion_body(request_id: str, model: str, choices: list[dict], usage_: dict) -> dict:
    return {"id": request_id, "object": "text_completion", "created": now(), "model": model,
            "choices": choices, "usage": usage_}


def completion_chunk(request_id: str, model: str, created: int, choices: list[dict],
                     with_usage_field: bool) -> dict:
    chunk = {"id": request_id, "object": "text_completion", "created": created, "model": model, "choices": choices}
    if with_usage_field:
        chunk["usage"] = None
    return chunk


# ---- /v1/chat/completions -------------------------------------------------------------------------
def chat_choice(index: int, text: str, logprobs: dict | None, finish_reason: str | None,
                stop_reason: int | str | None = None) -> dict:
    return {"index": index, "message": {"role": "assistant", "content": text}, "logprobs": logprobs,
            "finish_reason": finish_reason, "stop_reason": stop_reason}


def chat_body(request_id: str, model: str, choices: list[dict], usage_: dict) -> dict:
    return {"id": request_id, "object": "chat.completion", "created": now(), "model": model,
            "choices": choices, "usage": usage_}


def chat_chunk(request_id: str, model: str, created: int, choices: list[dict], with_usage_field: bool) -> dict:
    chunk = {"id": request_id, "object": "chat.completion.chunk", "created": created, "model": model,
             "choices": choices}
    if with_usage_field:
        chunk["usage"] = None
    return chunk


def chat_delta_choice(index: int, delta: dict, logprobs: dict | None = None,
                      finish_reason: str | None = None) -> dict:
    return {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}


def usage_chunk(request_id: str, model: str, created: int, obj: str, usage_: dict) -> dict:
    return {"id": request_id, "object": obj, "created": created, "model": model, "choices": [], "usage": usage_}
