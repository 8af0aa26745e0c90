"""SamplingParams: defaults, normalisation, and one typed error per invalid value, naming the field."""

from __future__ import annotations

import dataclasses
import math
import re

import pytest

from forklm.errors import InvalidParameterError
from forklm.sampling import SamplingParams


def test_defaults_match_vllm_names():
    p = SamplingParams()
    assert (p.n, p.best_of, p.temperature, p.top_k, p.top_p, p.min_p) == (1, None, 1.0, 0, 1.0, 0.0)
    assert (p.repetition_penalty, p.presence_penalty, p.frequency_penalty) == (1.0, 0.0, 0.0)
    assert (p.min_tokens, p.max_tokens, p.stop, p.stop_token_ids) == (0, 16, [], [])
    assert (p.logit_bias, p.seed, p.logprobs, p.prompt_logprobs, p.beam_width) == ({}, None, None, None, 1)
    assert p.skip_special_tokens and not p.ignore_eos and p.early_stopping is False
    assert p.num_sequences == 1 and not p.greedy and not p.use_beam_search


def test_every_field_has_a_docstring():
    import ast
    import inspect

    import forklm.sampling.params as module

    tree = ast.parse(inspect.getsource(module))
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "SamplingParams")
    documented = set()
    for a, b in zip(cls.body, cls.body[1:]):
        if isinstance(a, ast.AnnAssign) and isinstance(b, ast.Expr) and isinstance(b.value, ast.Constant):
            documented.add(a.target.id)
    assert documented == {f.name for f in dataclasses.fields(SamplingParams)}


def test_normalisation():
    p = SamplingParams(stop="###", logit_bias={"50": -100, 7: 2}, temperature=0, top_p=1)
    assert p.stop == ["###"]
    assert p.logit_bias == {50: -100.0, 7: 2.0}
    assert isinstance(p.temperature, float) and p.greedy
    assert SamplingParams(stop=("a", "b")).stop == ["a", "b"]
    assert SamplingParams(stop=None).stop == []


def test_num_sequences():
    assert SamplingParams(n=3).num_sequences == 3
    assert SamplingParams(n=2, best_of=5).num_sequences == 5
    assert SamplingParams(n=2, beam_width=4, temperature=0).num_sequences == 4


def test_immutable_and_replace_revalidates():
    p = SamplingParams()
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.temperature = 0.5  # type: ignore[misc]
    with pytest.raises(InvalidParameterError) as e:
        dataclasses.replace(p, top_p=0.0)
    assert e.value.field == "top_p"


INVALID = [
    ("n", 0), ("n", -1), ("n", 1.0), ("n", True), ("n", "2"),
    ("temperature", -0.1), ("temperature", math.nan), ("temperature", math.inf), ("temperature", "1"),
    ("temperature", True), ("temperature", None),
    ("top_k", -2), ("top_k", 1.5), ("top_k", None),
    ("top_p", 0.0), ("top_p", 1.01), ("top_p", -0.5), ("top_p", math.nan), ("top_p", "0.9"),
    ("min_p", -0.01), ("min_p", 1.5), ("min_p", math.inf),
    ("repetition_penalty", 0.0), ("repetition_penalty", -1.0), ("repetition_penalty", math.nan),
    ("repetition_penalty", 1e-50), ("repetition_penalty", 1e50), ("temperature", 1e-46), ("temperature", 5e-5),
    ("presence_penalty", 2.5), ("presence_penalty", -2.01), ("presence_penalty", math.inf),
    ("frequency_penalty", 3), ("frequency_penalty", math.nan), ("frequency_penalty", [1]),
    ("max_tokens", 0), ("max_tokens", None), ("max_tokens", 2.0),
    ("min_tokens", -1), ("min_tokens", 17),  # > max_tokens=16
    ("stop", ""), ("stop", ["ok", ""]), ("stop", [1]), ("stop", 5),
    ("stop_token_ids", [-1]), ("stop_token_ids", ["3"]), ("stop_token_ids", 3), ("stop_token_ids", [True]),
    ("include_stop_str_in_output", 1),
    ("bad_words", [""]), ("bad_words", [3]),
    ("logit_bias", {1: 101}), ("logit_bias", {1: -100.5}), ("logit_bias", {-1: 1.0}), ("logit_bias", {"x": 1.0}), ("logit_bias", {"²": 1.0}), ("logit_bias", {"١": 1.0}),
    ("logit_bias", {1: math.nan}), ("logit_bias", {1: "1"}), ("logit_bias", [1, 2]), ("logit_bias", {1.5: 1.0}),
    ("seed", 1.5), ("seed", "7"), ("seed", True),
    ("logprobs", -1), ("logprobs", 21), ("logprobs", 1.0),
    ("prompt_logprobs", -1), ("prompt_logprobs", 21),
    ("ignore_eos", "yes"), ("skip_special_tokens", None),
    ("no_repeat_ngram_size", -1), ("no_repeat_ngram_size", 2.0),
    ("beam_width", 0), ("beam_width", 2.0),
    ("length_penalty", math.nan), ("length_penalty", "1"),
    ("early_stopping", "always"), ("early_stopping", 1), ("early_stopping", None),
]


@pytest.mark.parametrize("field,value", INVALID, ids=[f"{f}={v!r}" for f, v in INVALID])
def test_invalid_value_names_the_field(field, value):
    with pytest.raises(InvalidParameterError) as e:
        SamplingParams(**{field: value})
    assert e.value.field == field
    assert str(e.value).startswith(f"{field}:")


@pytest.mark.parametrize("field, value, limit", [
    ("n", 4097, "4096"), ("best_of", 4097, "4096"), ("stop", ["x"] * 33, "at most 32 entries"),
    ("stop", ["x" * 1025], "at most 1024 characters"), ("bad_words", ["w"] * 33, "at most 32 entries"),
    ("stop_token_ids", [1] * 1025, "at most 1024 entries"), ("logit_bias", {i: 1.0 for i in range(1025)}, "at most 1024"),
    ("temperature", 1e-46, ">= 0.0001"), ("repetition_penalty", 1e-50, "[0.0001, 10000]"),
], ids=["n", "best_of", "stop-count", "stop-length", "bad_words", "stop_token_ids", "logit_bias", "temperature",
        "repetition_penalty"])
def test_size_limits_are_named_in_the_message(field, value, limit):
    with pytest.raises(InvalidParameterError, match=re.escape(limit)) as e:
        SamplingParams(**{field: value})
    assert e.value.field == field


def test_cross_field_rules():
    for kwargs, field in [
        (dict(n=3, best_of=2), "best_of"),
        (dict(beam_width=4), "temperature"),  # beam search needs temperature 0
        (dict(beam_width=2, temperature=0, n=3), "n"),
        (dict(beam_width=2, temperature=0, best_of=2), "best_of"),
        (dict(max_tokens=4, min_tokens=5), "min_tokens"),
    ]:
        with pytest.raises(InvalidParameterError) as e:
            SamplingParams(**kwargs)
        assert e.value.field == field, kwargs
    SamplingParams(beam_width=4, temperature=0, n=4, early_stopping="never", length_penalty=-0.5)
    SamplingParams(top_k=-1)
    SamplingParams(n=2, best_of=2, seed=-(2**70))


def test_unknown_field():
    with pytest.raises(TypeError):
        SamplingParams(**{"unknown": 1})
    with pytest.raises(InvalidParameterError) as e:
        SamplingParams.from_dict({"temperature": 0.5, "unknown": 1})
    assert e.value.field == "unknown"
    with pytest.raises(InvalidParameterError) as e:
        SamplingParams.from_dict({"top_p": 2})
    assert e.value.field == "top_p"
    assert SamplingParams.from_dict({"n": 2, "stop": "x"}) == SamplingParams(n=2, stop=["x"])
