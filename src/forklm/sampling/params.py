"""Per-request sampling parameters: the one boundary where user values are checked.

Field names follow vLLM / the OpenAI API. A `SamplingParams` is immutable and valid once built:
every check happens in `__post_init__` and names the offending field through
`InvalidParameterError`. The engine turns many of them into per-row tensors
(`forklm.sampling.tensors.SamplingTensors`) and never looks at them again during a step.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from forklm.errors import InvalidParameterError

#: Largest number of top alternatives that `logprobs` / `prompt_logprobs` may ask for.
MAX_LOGPROBS = 20
#: Bound on |logit_bias| values, as in the OpenAI API.
MAX_LOGIT_BIAS = 100.0
#: Size limits, checked before any work (each one is named in its error message).
MAX_STOP_STRINGS = 32  # entries of stop / bad_words
MAX_STOP_CHARS = 1024  # characters of one stop string / bad word
MAX_TOKEN_ID_LIST = 1024  # entries of stop_token_ids
MAX_LOGIT_BIAS_ENTRIES = 1024
MAX_N = 4096  # n and best_of, whatever the cache holds (the engine's own limit is checked later)
#: Smallest temperature above 0 (greedy): below it, logits / temperature leave float32's range
#: (1e-46 gave NaN log probs and token 0 repeated); the draws are all but greedy long before.
MIN_TEMPERATURE = 1e-4
#: Bounds on repetition_penalty, for the same reason (it divides or multiplies float32 logits).
MIN_REPETITION_PENALTY, MAX_REPETITION_PENALTY = 1e-4, 1e4
#: Bound on |presence_penalty| and |frequency_penalty|, as in the OpenAI API.
MAX_PENALTY = 2.0


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_int(name: str, value: Any, minimum: int | None = None, maximum: int | None = None) -> int:
    if not _is_int(value):
        raise InvalidParameterError(name, f"must be an integer, got {type(value).__name__} {value!r}")
    if minimum is not None and value < minimum:
        raise InvalidParameterError(name, f"must be >= {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise InvalidParameterError(name, f"must be <= {maximum}, got {value}")
    return value


def _check_optional_int(name: str, value: Any, minimum: int, maximum: int | None = None) -> int | None:
    return None if value is None else _check_int(name, value, minimum, maximum)


def _check_float(name: str, value: Any) -> float:
    """An int or float (not a bool), finite. Returned as a float."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidParameterError(name, f"must be a number, got {type(value).__name__} {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise InvalidParameterError(name, f"must be finite, got {value}")
    return value


def _check_bool(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise InvalidParameterError(name, f"must be true or false, got {type(value).__name__} {value!r}")
    return value


def _check_str_list(name: str, value: Any) -> list[str]:
    """None -> [], a str -> [str], a list/tuple of non-empty str -> a fresh list."""
    if value is None:
        return []
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, (list, tuple)):
        raise InvalidParameterError(name, f"must be a string or a list of strings, got {type(value).__name__}")
    for item in value:
        if not isinstance(item, str):
            raise InvalidParameterError(name, f"every entry must be a string, got {type(item).__name__} {item!r}")
        if item == "":
            raise InvalidParameterError(name, "empty strings are not allowed")
        if len(item) > MAX_STOP_CHARS:
            raise InvalidParameterError(name, f"every entry must be at most {MAX_STOP_CHARS} characters, got {len(item)}")
    if len(value) > MAX_STOP_STRINGS:
        raise InvalidParameterError(name, f"at most {MAX_STOP_STRINGS} entries, got {len(value)}")
    return list(value)


def _check_token_ids(name: str, value: Any) -> list[int]:
    if value is None:
        return []
    if not isinstance(value, (list, tuple)):
        raise InvalidParameterError(name, f"must be a list of token ids, got {type(value).__name__}")
    if len(value) > MAX_TOKEN_ID_LIST:
        raise InvalidParameterError(name, f"at most {MAX_TOKEN_ID_LIST} entries, got {len(value)}")
    for item in value:
        _check_int(name, item, minimum=0)
    return list(value)


def _check_logit_bias(value: Any) -> dict[int, float]:
    """Keys are token ids (ints, or decimal strings as JSON sends them); values in [-100, 100]."""
    name = "logit_bias"
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise InvalidParameterError(name, f"must be a mapping of token id to bias, got {type(value).__name__}")
    if len(value) > MAX_LOGIT_BIAS_ENTRIES:
        raise InvalidParameterError(name, f"at most {MAX_LOGIT_BIAS_ENTRIES} entries, got {len(value)}")
    out: dict[int, float] = {}
    for key, bias in value.items():
        if isinstance(key, str) and key.strip().isascii() and key.strip().isdigit():  # not "²": int() refuses it
            key = int(key)
        if not _is_int(key) or key < 0:
            raise InvalidParameterError(name, f"keys must be non-negative token ids, got {key!r}")
        bias = _check_float(name, bias)
        if abs(bias) > MAX_LOGIT_BIAS:
            raise InvalidParameterError(name, f"bias of token {key} must be in [-100, 100], got {bias}")
        out[key] = bias
    return out


@dataclass(frozen=True)
class SamplingParams:
    """How to draw the continuations of one request. Checked once, immutable afterwards."""

    n: int = 1
    """Number of sequences returned for the request."""
    best_of: int | None = None
    """Number of sequences drawn, of which the `n` with the highest cumulative log prob are
    returned. None means `n`. Must be >= n."""
    temperature: float = 1.0
    """Softmax temperature, >= 0. 0 means greedy (argmax); then top_k, top_p and min_p do nothing."""
    top_k: int = 0
    """Keep only the k most likely tokens. 0 or -1 turns it off; otherwise >= 1."""
    top_p: float = 1.0
    """Nucleus sampling: keep the smallest set of most likely tokens whose probability sums to
    at least top_p. In (0, 1]; 1 turns it off."""
    min_p: float = 0.0
    """Drop tokens whose probability is below min_p times the most likely token's. In [0, 1]."""
    repetition_penalty: float = 1.0
    """> 0. Logits of tokens seen in the prompt or the output are divided by it when positive and
    multiplied by it when negative (as in transformers). 1 turns it off."""
    presence_penalty: float = 0.0
    """In [-2, 2]. Subtracted once from the logit of every token already generated (OpenAI)."""
    frequency_penalty: float = 0.0
    """In [-2, 2]. Subtracted from a token's logit once per time it was generated (OpenAI)."""
    min_tokens: int = 0
    """EOS and `stop_token_ids` are banned until this many tokens have been generated. <= max_tokens."""
    max_tokens: int = 16
    """Most tokens generated per sequence, >= 1."""
    stop: list[str] = field(default_factory=list)
    """Strings that end a sequence when they appear in its text. A single str becomes a
    one-element list; empty strings are refused."""
    stop_token_ids: list[int] = field(default_factory=list)
    """Token ids that end a sequence (in addition to the model's EOS)."""
    include_stop_str_in_output: bool = False
    """Keep the matched stop string at the end of the returned text."""
    bad_words: list[str] = field(default_factory=list)
    """Words never generated. The engine tokenizes them (with and without a leading space)."""
    logit_bias: dict[int, float] = field(default_factory=dict)
    """Token id -> value added to its logit, each in [-100, 100]. String keys of decimal digits
    (as JSON sends them) are converted to ints."""
    seed: int | None = None
    """Seed of the request's random draws. None: the engine draws a fresh one (`fresh_seed`)."""
    logprobs: int | None = None
    """Number of top alternatives (0..20) whose log probs are returned with each generated token.
    None: none. The chosen token's log prob is always computed."""
    prompt_logprobs: int | None = None
    """Number of top alternatives (0..20) returned for each prompt position. None: none."""
    ignore_eos: bool = False
    """Keep generating after EOS (the EOS token does not end the sequence)."""
    no_repeat_ngram_size: int = 0
    """If > 0, no n-gram of this size (prompt included) occurs twice (as in transformers)."""
    beam_width: int = 1
    """Beam search with this many beams when > 1. Then `temperature` must be 0 (beam search is
    deterministic), `n` <= beam_width and `best_of` unset."""
    length_penalty: float = 1.0
    """Beam search: a finished hypothesis scores sum(log probs) / length ** length_penalty."""
    early_stopping: bool | str = False
    """Beam search stopping rule, as transformers' `early_stopping`: True stops a request as soon
    as it has beam_width finished hypotheses; False stops when no better one is likely (a
    heuristic); "never" stops only when no better one is possible."""
    skip_special_tokens: bool = True
    """Leave special tokens out of the returned text."""

    def __post_init__(self) -> None:
        set_ = object.__setattr__  # frozen dataclass: normalised values are written this way
        _check_int("n", self.n, minimum=1, maximum=MAX_N)
        if self.best_of is not None:
            _check_int("best_of", self.best_of, minimum=self.n, maximum=MAX_N)
        set_(self, "temperature", _check_float("temperature", self.temperature))
        if self.temperature < 0:
            raise InvalidParameterError("temperature", f"must be >= 0, got {self.temperature}")
        if 0 < self.temperature < MIN_TEMPERATURE:
            raise InvalidParameterError(
                "temperature", f"must be 0 (greedy) or >= {MIN_TEMPERATURE:g}, got {self.temperature:g}")
        _check_int("top_k", self.top_k, minimum=-1)
        set_(self, "top_p", _check_float("top_p", self.top_p))
        if not 0.0 < self.top_p <= 1.0:
            raise InvalidParameterError("top_p", f"must be in (0, 1], got {self.top_p}")
        set_(self, "min_p", _check_float("min_p", self.min_p))
        if not 0.0 <= self.min_p <= 1.0:
            raise InvalidParameterError("min_p", f"must be in [0, 1], got {self.min_p}")
        set_(self, "repetition_penalty", _check_float("repetition_penalty", self.repetition_penalty))
        if not MIN_REPETITION_PENALTY <= self.repetition_penalty <= MAX_REPETITION_PENALTY:
            raise InvalidParameterError(
                "repetition_penalty", f"must be in [{MIN_REPETITION_PENALTY:g}, {MAX_REPETITION_PENALTY:g}] "
                f"(1 = off), got {self.repetition_penalty:g}")
        for name in ("presence_penalty", "frequency_penalty"):
            value = _check_float(name, getattr(self, name))
            if abs(value) > MAX_PENALTY:
                raise InvalidParameterError(name, f"must be in [-2, 2], got {value}")
            set_(self, name, value)
        _check_int("max_tokens", self.max_tokens, minimum=1)
        _check_int("min_tokens", self.min_tokens, minimum=0, maximum=self.max_tokens)
        set_(self, "stop", _check_str_list("stop", self.stop))
        set_(self, "stop_token_ids", _check_token_ids("stop_token_ids", self.stop_token_ids))
        _check_bool("include_stop_str_in_output", self.include_stop_str_in_output)
        set_(self, "bad_words", _check_str_list("bad_words", self.bad_words))
        set_(self, "logit_bias", _check_logit_bias(self.logit_bias))
        if self.seed is not None:
            _check_int("seed", self.seed)
        _check_optional_int("logprobs", self.logprobs, 0, MAX_LOGPROBS)
        _check_optional_int("prompt_logprobs", self.prompt_logprobs, 0, MAX_LOGPROBS)
        _check_bool("ignore_eos", self.ignore_eos)
        _check_int("no_repeat_ngram_size", self.no_repeat_ngram_size, minimum=0)
        _check_int("beam_width", self.beam_width, minimum=1)
        set_(self, "length_penalty", _check_float("length_penalty", self.length_penalty))
        if not isinstance(self.early_stopping, bool) and self.early_stopping != "never":
            raise InvalidParameterError(
                "early_stopping", f'must be true, false or "never", got {self.early_stopping!r}'
            )
        _check_bool("skip_special_tokens", self.skip_special_tokens)
        if self.beam_width > 1:
            if self.temperature != 0.0:
                raise InvalidParameterError(
                    "temperature", f"must be 0 with beam search (beam_width={self.beam_width})"
                )
            if self.n > self.beam_width:
                raise InvalidParameterError("n", f"must be <= beam_width={self.beam_width}, got {self.n}")
            if self.best_of is not None:
                raise InvalidParameterError("best_of", "cannot be combined with beam search")

    @property
    def num_sequences(self) -> int:
        """Number of sequences the engine decodes for this request (samples or beams)."""
        return max(self.n, self.best_of or self.n, self.beam_width)

    @property
    def greedy(self) -> bool:
        """True when every token is the argmax (temperature 0)."""
        return self.temperature == 0.0

    @property
    def use_beam_search(self) -> bool:
        """True when the request is decoded by beam search."""
        return self.beam_width > 1

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> SamplingParams:
        """Build from a mapping (e.g. parsed JSON); an unknown key is an error that names it."""
        if not isinstance(values, Mapping):
            raise InvalidParameterError("sampling_params", f"must be a mapping, got {type(values).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        for key in values:
            if key not in known:
                raise InvalidParameterError(str(key), "unknown sampling parameter")
        return cls(**values)
