"""A bounded fuzz of the request schema: whatever a client sends, the server answers below 500.

Hypothesis draws bodies for /v1/completions, /v1/chat/completions and /v1/load_weights: every field
with valid values, boundary values, wrong types, huge / negative / overflowing numbers (1e400, NaN and
Infinity as Python's JSON parser takes them, integers past its 4300-digit limit), odd unicode (lone
surrogates as \\ud800 escapes, and as raw surrogate bytes), empty and long strings and lists, nested
junk and unknown fields; and raw bodies: bytes that are not JSON, JSON in UTF-16 / UTF-32, truncated
JSON, wrong content types, chunked uploads. They go to ONE real `forklm serve` process (a tiny random
model with a character-level tokenizer) over HTTP. For every case:

* the status is below 500 (a hang fails on the client's timeout);
* a non-200 answer is OpenAI's error JSON `{"error": {"message", "type", "param", "code"}}`;
* a 200 JSON answer has choices and usage; a 200 stream ends with `data: [DONE]` or an error event,
  and its error events are no server errors;

and after each fuzz test the server still answers /health with 200 and serves a normal request.
Bounded (max_examples, deadline=None) and derandomized, so it is reproducible and takes about 40 s on 2
busy CPU cores, most of it the server's start; FUZZ_SCALE=5 runs five times as many examples.
"""

from __future__ import annotations

import json
import math
import os

import httpx
import pytest
from server_fixtures import SPECIAL, ServerProcess, make_tiny_model

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

MAX_BATCH, MAX_PROMPTS, MAX_TOKENS, MAX_PROMPT_LEN, MAX_QUEUE = 8, 4, 16, 128, 16
VOCAB = 211
CMPL, CHAT, WEIGHTS = "/v1/completions", "/v1/chat/completions", "/v1/load_weights"
TIMEOUT_S = 20  # one request; the longest valid one here takes well under a second

# FUZZ_SCALE=5 python -m pytest tests/server/test_server_fuzz.py: a longer run, as reproducible
SCALE = float(os.environ.get("FUZZ_SCALE", "1"))


def fuzz_settings(max_examples: int):
    return settings(
        max_examples=max(1, int(max_examples * SCALE)),
        deadline=None,
        derandomize=True,
        database=None,  # derandomized: nothing to remember, and no .hypothesis folder in the tree
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much,
                               HealthCheck.large_base_example],
        print_blob=False,
    )


# ---- the server ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def server(tmp_path_factory):
    folder = make_tiny_model(tmp_path_factory.mktemp("tiny_fuzz"))
    srv = ServerProcess(folder, "--enable-load-weights", "--max-batch", str(MAX_BATCH), "--max-prompts", str(MAX_PROMPTS),
                        "--max-tokens", str(MAX_TOKENS), "--max-prompt-len", str(MAX_PROMPT_LEN),
                        "--max-queue", str(MAX_QUEUE))
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def model_name(server):
    return httpx.get(server.url + "/v1/models", timeout=TIMEOUT_S).json()["data"][0]["id"]


# ---- JSON with the junk JSON (or Python's parser) allows -------------------------------------------
class Raw(str):
    """JSON text sent as it is: number tokens such as 1e400, NaN, -0, or an integer of 5000 digits."""


class _Served:
    """Stands for the served model's name (known only once the server runs)."""

    def __repr__(self) -> str:
        return "SERVED_MODEL"


SERVED = _Served()


def dumps(value, model: str, ascii_only: bool = True) -> str:
    """`value` as JSON text; strings keep lone surrogates (as \\udxxx escapes when ascii_only)."""
    if isinstance(value, Raw):
        return str(value)
    if value is SERVED:
        value = model
    if isinstance(value, float) and not math.isfinite(value):
        return {math.inf: "Infinity", -math.inf: "-Infinity"}.get(value, "NaN")
    if value is None or isinstance(value, (bool, int, float, str)):
        return json.dumps(value, ensure_ascii=ascii_only)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(dumps(v, model, ascii_only) for v in value) + "]"
    if isinstance(value, dict):
        items = (f"{json.dumps(k, ensure_ascii=ascii_only)}: {dumps(v, model, ascii_only)}" for k, v in value.items())
        return "{" + ", ".join(items) + "}"
    raise TypeError(type(value))


def encode(value, model: str, how: str = "ascii") -> bytes:
    """The body bytes: ASCII JSON (surrogates escaped), UTF-8 with raw surrogate bytes, or UTF-16/32."""
    if how == "ascii":
        return dumps(value, model).encode("ascii")
    text = dumps(value, model, ascii_only=False)
    if how == "utf-8":
        return text.encode("utf-8", "surrogatepass")  # a lone surrogate becomes CESU-style bytes
    if how == "utf-8-sig":
        return b"\xef\xbb\xbf" + text.encode("utf-8", "surrogatepass")
    return text.encode(how, "surrogatepass")  # utf-16, utf-16-le, utf-32, ...


# ---- strategies ------------------------------------------------------------------------------------
ODD_CHARS = ["\ud800", "\udbff", "\udc00", "\udfff", "\udc80", "\x00", "\x7f", "\u2028", "\ufeff", "\ufffd",
             "\uffff", "\U0010ffff", "\U0001f600", "\u0301", "\u202e", "é", "\n", "\r", "\t", "\\", '"', "'",
             "{{", "}}", "{%", "%}", *SPECIAL]
SURROGATES = [c for c in ODD_CHARS if 0xD800 <= ord(c[0]) <= 0xDFFF]
chars = st.one_of(st.characters(), st.characters(min_codepoint=32, max_codepoint=126), st.sampled_from(ODD_CHARS))
#: what a valid text may hold: anything but lone surrogates (which are refused)
valid_chars = st.one_of(st.characters(), st.characters(min_codepoint=32, max_codepoint=126),
                        st.sampled_from([c for c in ODD_CHARS if c not in SURROGATES]))


def texts(min_size: int = 0, max_size: int = 24, valid: bool = False) -> st.SearchStrategy[str]:
    return st.lists(valid_chars if valid else chars, min_size=min_size, max_size=max_size).map("".join)


plain_text = st.text(st.characters(min_codepoint=32, max_codepoint=126), min_size=1, max_size=20)
long_text = st.sampled_from([127, 128, 129, 300, 2000]).map(lambda n: "x" * n)

RAW_NUMBERS = ["1e400", "-1e400", "1e-400", "-0", "-0.0", "0.0", "NaN", "Infinity", "-Infinity", "1E2", "1.5e308",
               "4.9e-324", "123456789012345678901234567890", "-99999999999999999999", "1" + "0" * 5000,
               "1." + "1" * 5000]
raw_numbers = st.sampled_from([Raw(x) for x in RAW_NUMBERS])
BOUNDARY_INTS = [0, 1, -1, 2, 3, 7, 8, 9, 15, 16, 17, 20, 21, 127, 128, 129, 144, 145, 210, 211, 212, 255, 256, 257,
                 4096, 4097, 2**31 - 1, 2**31, 2**32, 2**53 + 1, 2**63 - 1, 2**63, 2**64, -(2**63) - 1, 10**30]
boundary_ints = st.sampled_from(BOUNDARY_INTS)
BOUNDARY_FLOATS = [0.0, -0.0, 1.0, -1.0, 0.5, 1e-4, 9.99e-5, 1e-5, 1e-300, 5e-324, 1e300, 1.7976931348623157e308,
                   2.0, 2.0000001, -2.0, -2.0000001, 100.0, 100.5, -100.0, -100.5, 1e4, 1.0001e4, math.inf,
                   -math.inf, math.nan]
boundary_floats = st.sampled_from(BOUNDARY_FLOATS)
any_ints = st.one_of(st.integers(), boundary_ints)
any_floats = st.one_of(st.floats(), boundary_floats)

junk_leaf = st.one_of(st.none(), st.booleans(), any_ints, any_floats, texts(), raw_numbers)
junk = st.recursive(junk_leaf, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                       st.dictionaries(texts(max_size=6), inner, max_size=4)),
                    max_leaves=12)


def hostile(boundary: st.SearchStrategy) -> st.SearchStrategy:
    """A field's bad value: a boundary value (most often), null, or junk of any type."""
    return st.one_of(boundary, boundary, st.none(), junk)


small_bool = st.booleans()
stop_strings = st.one_of(texts(1, 6, valid=True), plain_text)
token_id = st.one_of(st.integers(0, VOCAB - 1), st.sampled_from([-1, VOCAB, VOCAB + 1, 10**6, 2**63]))
LOGIT_KEYS = ["0", "5", "65", "210", "211", "-1", " 5", "5 ", "05", "+5", "1e2", "0x10", "abc", "", "²", "５",
              "9" * 30, "1" + "0" * 5000]
logit_key = st.one_of(st.integers(0, VOCAB - 1).map(str), st.sampled_from(LOGIT_KEYS), texts(max_size=4))

#: valid-ish value of every field the two generation endpoints share (most pass validation)
SHARED_VALID = {
    "model": st.sampled_from([SERVED, SERVED, None]),
    "n": st.integers(1, 3),
    "max_tokens": st.integers(1, 3),
    "temperature": st.one_of(st.just(0.0), st.floats(1e-4, 2.0)),
    "top_p": st.floats(0.01, 1.0),
    "presence_penalty": st.floats(-2.0, 2.0),
    "frequency_penalty": st.floats(-2.0, 2.0),
    "stop": st.one_of(stop_strings, st.lists(stop_strings, max_size=4)),
    "seed": st.integers(-(2**70), 2**70),
    "stream": st.sampled_from([True, True, False]),
    "stream_options": st.fixed_dictionaries({}, optional={"include_usage": small_bool}),
    "user": texts(valid=True),
    "logit_bias": st.dictionaries(st.integers(0, VOCAB - 1).map(str), st.floats(-100.0, 100.0), max_size=4),
    "best_of": st.integers(1, 4),
    "top_k": st.integers(-1, VOCAB + 5),
    "min_p": st.floats(0.0, 1.0),
    "repetition_penalty": st.floats(1e-4, 10.0),
    "min_tokens": st.integers(0, 3),
    "stop_token_ids": st.lists(st.integers(0, VOCAB - 1), max_size=4),
    "ignore_eos": small_bool,
    "include_stop_str_in_output": small_bool,
    "skip_special_tokens": small_bool,
    "no_repeat_ngram_size": st.integers(0, 4),
}
#: boundary values per field, besides null and junk of any type
SHARED_BOUNDARY = {
    "model": st.one_of(texts(), st.sampled_from(["", "default", "gpt-4o", "tiny_fuzz0", "/", "../" * 5])),
    "n": boundary_ints,
    "max_tokens": boundary_ints,
    "temperature": boundary_floats,
    "top_p": boundary_floats,
    "presence_penalty": boundary_floats,
    "frequency_penalty": boundary_floats,
    "stop": st.one_of(st.just(""), texts(1, 6), long_text, st.lists(stop_strings, min_size=30, max_size=40),
                      st.just(["x" * 1025]), st.lists(st.one_of(stop_strings, any_ints, st.none()), max_size=4)),
    "seed": st.one_of(boundary_ints, raw_numbers),
    "stream": st.sampled_from([0, 1, "true", "false"]),
    "stream_options": st.one_of(junk, st.dictionaries(texts(max_size=8), junk, max_size=3)),
    "user": long_text,
    "logit_bias": st.one_of(st.dictionaries(logit_key, st.one_of(any_floats, raw_numbers, junk), max_size=4),
                            st.just({str(i): 1.0 for i in range(1025)})),
    "best_of": boundary_ints,
    "top_k": boundary_ints,
    "min_p": boundary_floats,
    "repetition_penalty": boundary_floats,
    "min_tokens": boundary_ints,
    "stop_token_ids": st.one_of(st.lists(token_id, max_size=6), st.just(list(range(1025))),
                                st.lists(junk, max_size=3)),
    "ignore_eos": st.sampled_from([0, 1, "yes"]),
    "include_stop_str_in_output": st.sampled_from([0, 1, "yes"]),
    "skip_special_tokens": st.sampled_from([0, 1, "no"]),
    "no_repeat_ngram_size": boundary_ints,
}

prompt_text = st.one_of(plain_text, texts(1, 30, valid=True))
token_list = st.lists(st.integers(0, VOCAB - 1), min_size=1, max_size=20)
CMPL_VALID = {
    **SHARED_VALID,
    "prompt": st.one_of(prompt_text, st.lists(prompt_text, min_size=1, max_size=MAX_PROMPTS), token_list,
                        st.lists(token_list, min_size=1, max_size=MAX_PROMPTS)),
    "echo": small_bool,
    "logprobs": st.integers(0, 5),
    "suffix": st.sampled_from([None, ""]),
}
CMPL_BOUNDARY = {
    **SHARED_BOUNDARY,
    "prompt": st.one_of(st.just(""), st.just([]), st.just([[]]), long_text, texts(1, 30),
                        st.lists(prompt_text, min_size=MAX_QUEUE - 1, max_size=MAX_QUEUE + 4),  # the queue's limit
                        st.lists(token_id, max_size=10), st.lists(st.lists(token_id, max_size=5), max_size=4),
                        st.lists(st.one_of(prompt_text, token_id, token_list), min_size=1, max_size=4)),
    "echo": st.sampled_from([0, 1, "true"]),
    "logprobs": st.one_of(boundary_ints, st.booleans()),
    "suffix": texts(),
}

roles = st.sampled_from(["user", "assistant", "system", "developer", "tool", "function", "", "bogus", "USER"])
text_part = st.fixed_dictionaries({"type": st.just("text"), "text": texts()})
valid_text_part = st.fixed_dictionaries({"type": st.just("text"), "text": texts(valid=True)})
odd_part = st.one_of(st.fixed_dictionaries({"type": st.sampled_from(["image_url", "input_audio", "TEXT", ""])},
                                           optional={"text": junk, "image_url": junk}),
                     st.dictionaries(texts(max_size=6), junk, max_size=3), junk)
valid_message = st.fixed_dictionaries(
    {"role": st.sampled_from(["user", "assistant", "system"]),
     "content": st.one_of(texts(max_size=20, valid=True), st.lists(valid_text_part, min_size=1, max_size=3))},
    optional={"name": plain_text},
)
hostile_message = st.one_of(
    valid_message,
    st.fixed_dictionaries({}, optional={
        "role": st.one_of(roles, junk),
        "content": st.one_of(texts(), long_text, st.lists(st.one_of(text_part, odd_part), max_size=3), junk),
        "name": junk, "tool_calls": junk, "tool_call_id": junk, "reasoning_content": junk, "": junk}),
    junk,
)
CHAT_VALID = {
    **SHARED_VALID,
    "messages": st.lists(valid_message, min_size=1, max_size=3),
    "logprobs": small_bool,
    "top_logprobs": st.integers(0, 5),
    "max_completion_tokens": st.integers(1, 3),
    "add_generation_prompt": small_bool,
}
CHAT_BOUNDARY = {
    **SHARED_BOUNDARY,
    "messages": st.one_of(st.just([]), st.lists(hostile_message, min_size=1, max_size=4),
                          st.lists(valid_message, min_size=20, max_size=30)),
    "logprobs": st.one_of(st.sampled_from([0, 1, "true"]), boundary_ints),
    "top_logprobs": boundary_ints,
    "max_completion_tokens": boundary_ints,
    "add_generation_prompt": st.sampled_from([0, 1, "false"]),
}
#: fields clients send that this server does not know (ignored)
UNKNOWN = st.dictionaries(st.sampled_from(["tools", "tool_choice", "service_tier", "response_format", "metadata",
                                           "store", "beam_width", "bad_words", "prompt_logprobs", "parallel_tool_calls",
                                           "", " ", "\ud800", "__proto__", "PROMPT", "Max_Tokens"]), junk, max_size=3)

def valid_bodies(fields: dict) -> st.SearchStrategy[dict]:
    """Bodies whose every field is valid-ish (many reach the engine), max_tokens small."""
    required = next(k for k in ("prompt", "messages") if k in fields)
    optional = {k: v for k, v in fields.items() if k not in (required, "max_tokens")}
    base = st.fixed_dictionaries({required: fields[required], "max_tokens": fields["max_tokens"]}, optional=optional)
    return st.tuples(base, UNKNOWN).map(lambda t: _consistent({**t[1], **t[0]}))


def _consistent(body: dict) -> dict:
    """Valid-ish bodies keep clear of the cross-field refusals that would make most of them 400s."""
    if "messages" in body and "top_logprobs" in body:
        body["logprobs"] = True  # top_logprobs needs logprobs
    if "min_tokens" in body:
        body["min_tokens"] = min(body["min_tokens"], body["max_tokens"])
    if "best_of" in body:
        body["best_of"] = max(body["best_of"], body.get("n", 1))
    return body


def hostile_bodies(valid: dict, boundary: dict) -> st.SearchStrategy:
    """Bodies with a few fields out of bounds or of the wrong type; the rest valid."""
    required = next(k for k in ("prompt", "messages") if k in valid)

    @st.composite
    def build(draw):
        body = draw(valid_bodies(valid))
        bad = draw(st.lists(st.sampled_from(sorted(boundary)), min_size=1, max_size=3, unique=True))
        for name in bad:
            body[name] = draw(hostile(boundary[name]))
        if draw(st.integers(0, 9)) == 0:
            body.pop(required, None)  # the required field missing
        if body.get("max_tokens") is None and draw(st.booleans()):
            body["max_tokens"] = 2  # keep most requests short
        return body

    return build()


# ---- sending and checking --------------------------------------------------------------------------
def check_error_body(text: str, where: str) -> dict:
    body = json.loads(text)
    assert isinstance(body, dict) and set(body) == {"error"}, f"{where}: not OpenAI's error JSON: {text[:500]}"
    error = body["error"]
    assert isinstance(error, dict) and set(error) == {"message", "type", "param", "code"}, f"{where}: {text[:500]}"
    assert isinstance(error["message"], str) and error["message"], f"{where}: {text[:500]}"
    assert isinstance(error["type"], str) and error["type"], f"{where}: {text[:500]}"
    assert error["param"] is None or isinstance(error["param"], str), f"{where}: {text[:500]}"
    assert error["code"] is None or isinstance(error["code"], str), f"{where}: {text[:500]}"
    return error


def log_tail(server: ServerProcess, chars: int = 3000) -> str:
    """The end of the server's log: the traceback of a 500 is there."""
    return server.output()[-chars:]


def describe(method: str, path: str, body: bytes, headers: dict) -> str:
    shown = body if len(body) <= 600 else body[:600] + b"...(%d bytes)" % len(body)
    return f"{method} {path} headers={headers} body={shown!r}"


def send(server: ServerProcess, path: str, body: bytes, headers: dict | None = None, method: str = "POST",
         chunked: bool = False) -> tuple[int, str]:
    """Send one request (its own connection: a failure cannot leak into the next), read all of the
    answer, check it; returns (status, text)."""
    headers = dict(headers if headers is not None else {"Content-Type": "application/json"})
    where = describe(method, path, body, headers)
    content = iter([body[: len(body) // 2], body[len(body) // 2:]]) if chunked else body
    assert server.proc.poll() is None, f"the server died before {where}:\n{log_tail(server)}"
    try:
        with httpx.Client(base_url=server.url, timeout=TIMEOUT_S) as http:
            with http.stream(method, path, content=content, headers=headers) as r:
                status, ctype = r.status_code, r.headers.get("content-type", "")
                raw = r.read()  # the whole answer, every event of a stream
    except httpx.HTTPError as error:
        raise AssertionError(f"{type(error).__name__} ({error}) on {where}\nserver log:\n"
                             f"{log_tail(server)}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        raise AssertionError(f"{status} on {where}: the answer is not UTF-8 ({error}): {raw[:500]!r}") from None
    lines = [line for line in text.split("\n") if line]  # SSE lines (U+2028 in a chunk is no line end)
    assert status < 500, f"{status} on {where}\nanswer: {text[:1000]}\nserver log:\n{log_tail(server)}"
    if status != 200:
        check_error_body(text, f"{status} on {where}")
    elif ctype.startswith("text/event-stream"):
        check_stream(lines, where)
    else:
        answer = json.loads(text)
        if path in (CMPL, CHAT):
            assert isinstance(answer.get("choices"), list) and answer["choices"], f"{where}: {text[:500]}"
            assert isinstance(answer.get("usage"), dict), f"{where}: {text[:500]}"
    return status, text


def check_stream(lines: list[str], where: str) -> None:
    assert lines, f"empty stream on {where}"
    assert all(line.startswith("data: ") for line in lines), f"{where}: {lines[:5]}"
    events = [line[len("data: "):] for line in lines]
    last_error = None
    for i, data in enumerate(events):
        if data == "[DONE]":
            assert i == len(events) - 1, f"events after [DONE] on {where}: {events[i:][:5]}"
            continue
        chunk = json.loads(data)
        if "error" in chunk:
            last_error = check_error_body(data, f"stream error event on {where}")
            assert last_error["type"] != "server_error", f"server error in the stream of {where}: {data}"
        else:
            assert isinstance(chunk.get("choices"), list), f"{where}: {data[:500]}"
    assert events[-1] == "[DONE]" or last_error is not None, f"stream without [DONE] on {where}: {events[-3:]}"


def post_json(server: ServerProcess, model: str, path: str, body, how: str = "ascii", **kwargs) -> tuple[int, str]:
    return send(server, path, encode(body, model, how), **kwargs)


def assert_still_serving(server: ServerProcess) -> None:
    assert server.proc.poll() is None, f"the server died:\n{log_tail(server)}"
    with httpx.Client(base_url=server.url, timeout=TIMEOUT_S) as http:
        assert http.get("/health").status_code == 200
        r = http.post(CMPL, json={"prompt": "ok", "max_tokens": 2, "ignore_eos": True})
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["completion_tokens"] == 2
        r = http.post(CHAT, json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "ignore_eos": True})
        assert r.status_code == 200, r.text
        metrics = http.get("/metrics").text
    assert 'status="500"' not in metrics, [line for line in metrics.splitlines() if 'status="5' in line]
    engine_errors = [line for line in metrics.splitlines() if line.startswith("forklm_engine_errors_total")]
    assert engine_errors and float(engine_errors[0].split()[-1]) == 0, engine_errors
    waiting = [line for line in metrics.splitlines() if line.startswith(("forklm_requests_waiting",
                                                                          "forklm_sample_rows_in_use"))]
    assert all(float(line.split()[-1]) == 0 for line in waiting), waiting  # nothing leaked


# ---- the fuzz tests --------------------------------------------------------------------------------
def test_fuzz_completions(server, model_name):
    statuses = []

    @fuzz_settings(60)
    @given(st.one_of(valid_bodies(CMPL_VALID), hostile_bodies(CMPL_VALID, CMPL_BOUNDARY)))
    @example({"prompt": "a\ud800b", "max_tokens": 1})  # lone surrogate (escaped)
    @example({"prompt": ["ab", "cd"], "max_tokens": 2, "n": 2, "stream": True, "echo": True, "logprobs": 2,
              "stream_options": {"include_usage": True}})
    @example({"prompt": "hi", "max_tokens": Raw("1" + "0" * 5000)})  # past Python's int-parsing limit
    @example({"prompt": "hi", "max_tokens": 1, "temperature": Raw("NaN"), "top_p": Raw("1e400")})
    def run(body):
        statuses.append(post_json(server, model_name, CMPL, body)[0])

    run()
    assert statuses.count(200) >= 10, statuses  # the valid-ish cases do reach the engine
    assert_still_serving(server)


def test_fuzz_chat_completions(server, model_name):
    statuses = []

    @fuzz_settings(60)
    @given(st.one_of(valid_bodies(CHAT_VALID), hostile_bodies(CHAT_VALID, CHAT_BOUNDARY)))
    @example({"messages": [{"role": "user", "content": "\udfff"}], "max_tokens": 1})
    @example({"messages": [{"role": "user", "content": [{"type": "text", "text": "a"}]}], "max_tokens": 2,
              "stream": True, "n": 3, "logprobs": True, "top_logprobs": 2, "stream_options": {"include_usage": True}})
    @example({"messages": [{"role": "user", "content": "x" * 300}], "max_completion_tokens": 1})
    def run(body):
        statuses.append(post_json(server, model_name, CHAT, body)[0])

    run()
    assert statuses.count(200) >= 10, statuses
    assert_still_serving(server)


CONTENT_TYPES = [None, "application/json", "application/json; charset=utf-8", "application/json; charset=utf-16",
                 "APPLICATION/JSON", "application/vnd.api+json", "application/x-ndjson", "text/plain", "text/json",
                 "application/x-www-form-urlencoded", "multipart/form-data; boundary=xyz", "application/octet-stream",
                 "application/", "application", "/json", "", ";", "application/json; charset=\"", "*/*",
                 "application/json, text/plain", "application/json;;;;=", "application/json; boundary=\x7f"]
ENCODINGS = ["ascii", "utf-8", "utf-8-sig", "utf-16", "utf-16-le", "utf-16-be", "utf-32", "latin-1"]


@st.composite
def raw_requests(draw):
    """(path, body bytes, headers, method, chunked): bytes that are not JSON, JSON of the wrong shape or in
    an odd encoding, truncated JSON, deep nesting, under odd content types."""
    path = draw(st.sampled_from([CMPL, CHAT]))
    kind = draw(st.sampled_from(["binary", "text", "encoded", "truncated", "top-level", "nested", "tokens"]))
    valid = CMPL_VALID if path == CMPL else CHAT_VALID
    if kind == "binary":
        body = draw(st.binary(max_size=64))
    elif kind == "text":
        body = draw(texts(max_size=40)).encode("utf-8", "surrogatepass")
    elif kind in ("encoded", "truncated"):
        how = draw(st.sampled_from(ENCODINGS))
        value = draw(valid_bodies(valid))
        try:
            body = encode(value, "default", how)
        except UnicodeEncodeError:  # latin-1 cannot hold every character
            body = encode(value, "default", "ascii")
        if kind == "truncated":
            body = body[: draw(st.integers(0, max(0, len(body) - 1)))]
    elif kind == "top-level":
        body = encode(draw(st.one_of(junk_leaf, st.lists(junk, max_size=3))), "default")
    elif kind == "nested":
        depth = draw(st.sampled_from([10, 100, 999, 1000, 3000, 20000]))
        opener, closer = draw(st.sampled_from([("[", "]"), ('{"a":', "}")]))
        field = draw(st.sampled_from(["prompt", "messages", "logit_bias", "stop"]))
        body = (f'{{"{field}": ' + opener * depth + "1" + closer * depth + "}").encode()
    else:  # JSON-ish token soup
        parts = draw(st.lists(st.sampled_from(['{', '}', '[', ']', ',', ':', '"prompt"', '"messages"', '"',
                                               'true', 'null', 'NaN', '-Infinity', '1e999', '"\\ud800"', '"\\u"',
                                               '"\\x41"', "'a'", '0x10', '01', '.5', '-', '\x00', ' ']),
                              max_size=30))
        body = "".join(parts).encode()
    ctype = draw(st.sampled_from(CONTENT_TYPES))
    headers = {} if ctype is None else {"Content-Type": ctype}
    if draw(st.integers(0, 5)) == 0:
        headers["Authorization"] = draw(st.sampled_from(["Bearer x", "Bearer", "", "Basic abc", "bearer  y"]))
    method = draw(st.sampled_from(["POST"] * 8 + ["PUT", "PATCH", "DELETE", "GET", "OPTIONS"]))
    chunked = draw(st.booleans())
    return path, body, headers, method, chunked


def test_fuzz_raw_bodies_and_content_types(server):
    @fuzz_settings(60)
    @given(raw_requests())
    @example((CMPL, b'{"prompt": "\xed\xa0\x80", "max_tokens": 1}', {"Content-Type": "application/json"}, "POST",
              False))  # a lone surrogate as raw (CESU-8) bytes
    @example((CMPL, '{"prompt": "hi", "max_tokens": 1}'.encode("utf-16"), {}, "POST", True))
    @example((CHAT, b'{"messages": "x"', {"Content-Type": "text/plain"}, "POST", True))
    @example((CMPL, b"", {}, "POST", True))
    def run(request):
        path, body, headers, method, chunked = request
        send(server, path, body, headers, method=method, chunked=chunked)

    run()
    assert_still_serving(server)


# ---- /v1/load_weights -------------------------------------------------------------------------------
INDEX = "model.safetensors.index.json"


@pytest.fixture(scope="module")
def weight_files(tmp_path_factory):
    """Files on the server's disk that are not weights, or not quite: {name: path}."""
    root = tmp_path_factory.mktemp("fuzz_weights")
    files = {}
    for name, data in {"garbage.safetensors": b"not a safetensors file", "empty.safetensors": b"",
                       "huge-header.safetensors": (2**62).to_bytes(8, "little") + b"{}",
                       "bad-json-header.safetensors": (4).to_bytes(8, "little") + b"{{{{",
                       "weights.bin": b"\x00" * 16}.items():
        (root / name).write_bytes(data)
        files[name] = str(root / name)
    folders = {
        "a-folder.safetensors": {}, "empty-folder": {}, "garbage-model": {"model.safetensors": b"\x01\x02"},
        "index-not-json": {INDEX: b"{"},
        "index-not-utf8": {INDEX: b'{"weight_map": {"\xff": "x.safetensors"}}'},
        "index-list": {INDEX: b"[1, 2]"},
        "index-map-list": {INDEX: b'{"weight_map": [1, 2]}'},
        "index-map-null": {INDEX: b'{"weight_map": null}'},
        "index-map-ints": {INDEX: b'{"weight_map": {"model.norm.weight": 5}}'},
        "index-map-empty": {INDEX: b'{"weight_map": {}}'},  # no tensors: a valid (empty) update
        "index-deep": {INDEX: b'{"weight_map": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"},
        "index-missing-shard": {INDEX: b'{"weight_map": {"model.norm.weight": "x.safetensors"}}'},
        "index-shard-is-folder": {INDEX: b'{"weight_map": {"model.norm.weight": "."}}'},
    }
    for name, contents in folders.items():
        (root / name).mkdir()
        for file, data in contents.items():
            (root / name / file).write_bytes(data)
        files[name] = str(root / name)
    return files


#: /v1/load_weights paths that got a 500 when this test was written (the minimal case of each cause);
#: the fuzz below keeps them as explicit examples. Names of the weight_files fixture, or literal paths.
LOAD_WEIGHTS_500 = [
    "~nosuchuser",  # RuntimeError from Path.expanduser (checkpoint.read_weights)
    "\ud800",  # the 400's message carries the lone surrogate: JSONResponse cannot encode it
    "x" * 256,  # OSError ENAMETOOLONG from Path.is_dir (a name over NAME_MAX)
    "index-not-utf8",  # UnicodeDecodeError from index.read_text() (SafetensorsReader)
    "index-list",  # TypeError: the index is not a JSON object
    "index-map-list",  # AttributeError: weight_map is not a mapping
    "index-map-ints",  # TypeError: a shard name is not a string
    "index-deep",  # RecursionError from json.loads of the index
]


def test_fuzz_load_weights(server, weight_files):
    names = sorted(weight_files)
    paths = st.one_of(
        st.sampled_from(names).map(weight_files.get),
        st.sampled_from(names).map(lambda n: weight_files[n] + "/"),
        texts(max_size=30),
        st.sampled_from(["", ".", "..", "/", "~", "~/", "~root", "~nosuchuser", "~nosuchuser/x.safetensors",
                         "/etc/passwd", "/proc/self/environ", "/dev/null", "a\x00b.safetensors", "\ud800.safetensors",
                         "x" * 255, "x" * 256, "x" * 5000, "/" + "a/" * 2100, "file:///etc/passwd",
                         "http://127.0.0.1/x.safetensors"]),
    )
    bodies = st.one_of(st.fixed_dictionaries({"path": paths}),
                       st.fixed_dictionaries({"path": st.one_of(paths, junk)}, optional={"extra": junk}),
                       junk)

    def run(body):
        status, _ = post_json(server, "", WEIGHTS, body)
        if status == 200:  # only the folder whose index names no tensor loads (an empty update)
            assert isinstance(body, dict) and str(body["path"]).rstrip("/") == weight_files["index-map-empty"], body

    for case in reversed(LOAD_WEIGHTS_500):
        run = example({"path": weight_files.get(case, case)})(run)
    fuzz_settings(30)(given(bodies)(run))()
    assert_still_serving(server)


@pytest.mark.parametrize("case", LOAD_WEIGHTS_500, ids=lambda c: ascii(c)[1:-1][:24])
def test_load_weights_minimal_cases(server, weight_files, case):
    """The minimal reproductions of LOAD_WEIGHTS_500, one test each: a 4xx with the error JSON."""
    post_json(server, "", WEIGHTS, {"path": weight_files.get(case, case)})
