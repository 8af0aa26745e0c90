"""`speculative_config`: what the user asks for, checked before any work, with vLLM's key names.

    {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 4, "prompt_lookup_min": 2}
    {"method": "draft_model", "model": "path/to/small-model", "num_speculative_tokens": 4}

forklm's own keys: "adaptive" (default true: a request whose drafts do not pay for their verify
steps decodes plainly; see switch.py) and "sibling_lookup" (ngram only, default false: a sample may
draft from its sibling samples' text when its own has no match; measured no better on the embedded
model, equal or slower in most cells of benchmarks/results/speculative_cpu.md).
"""

from __future__ import annotations

import json
import numbers
import os
from dataclasses import dataclass

from ...errors import InvalidParameterError

METHODS = ("ngram", "draft_model")
MAX_SPECULATIVE_TOKENS = 16
_KEYS = ("method", "num_speculative_tokens", "prompt_lookup_max", "prompt_lookup_min", "model", "adaptive",
         "sibling_lookup")
_FIELD = "speculative_config"


@dataclass(frozen=True)
class SpeculativeConfig:
    method: str
    """"ngram" (prompt lookup: drafts copied from the request's own text) or "draft_model"."""
    num_speculative_tokens: int
    """k: the most tokens drafted per sample and step (a verify step feeds up to k + 1 per row)."""
    prompt_lookup_max: int = 4
    """ngram: the longest suffix n-gram looked up in the text so far."""
    prompt_lookup_min: int = 2
    """ngram: the shortest suffix n-gram that may start a draft."""
    model: str | None = None
    """draft_model: a checkpoint (Hugging Face folder, .gguf, hub id) with the target's vocabulary."""
    adaptive: bool = True
    """Fall back to plain decoding for a request while its drafts do not pay (switch.py)."""
    sibling_lookup: bool = False
    """ngram: with no match in its own text, a sample looks in its sibling samples' outputs."""

    @classmethod
    def parse(cls, value) -> SpeculativeConfig | None:
        """A dict, a JSON string, a SpeculativeConfig or None -> a checked config (or None)."""
        if value is None or isinstance(value, SpeculativeConfig):
            return value
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError as e:
                raise InvalidParameterError(_FIELD, f"is not valid JSON ({e.msg} at character {e.pos})") from None
        if not isinstance(value, dict):
            raise InvalidParameterError(_FIELD, f"expected a dict (or a JSON object), got {type(value).__name__}")
        for key in value:
            if key not in _KEYS:
                raise InvalidParameterError(f"{_FIELD}.{key}", f"unknown key; known keys: {', '.join(_KEYS)}")
        method = value.get("method")
        if method is None:
            if value.get("model") is None:
                raise InvalidParameterError(f"{_FIELD}.method", f"is required: one of {', '.join(METHODS)}")
            method = "draft_model"  # vLLM infers the method from the model
        if method not in METHODS:
            raise InvalidParameterError(f"{_FIELD}.method", f"{method!r} is not one of {', '.join(METHODS)}")
        if "num_speculative_tokens" not in value:
            raise InvalidParameterError(f"{_FIELD}.num_speculative_tokens", "is required (an int >= 1)")
        k = _int(value, "num_speculative_tokens", 1, MAX_SPECULATIVE_TOKENS)
        args = dict(method=method, num_speculative_tokens=k)
        if method == "ngram":
            for key in ("model",):
                if value.get(key) is not None:
                    raise InvalidParameterError(f"{_FIELD}.{key}", "is only for method draft_model")
            hi = _int(value, "prompt_lookup_max", 1, 64, default=cls.prompt_lookup_max)
            lo = _int(value, "prompt_lookup_min", 1, 64, default=min(cls.prompt_lookup_min, hi))
            if "prompt_lookup_max" not in value and lo > hi:
                hi = lo
            if lo > hi:
                raise InvalidParameterError(f"{_FIELD}.prompt_lookup_min",
                                            f"{lo} exceeds prompt_lookup_max ({hi})")
            args.update(prompt_lookup_max=hi, prompt_lookup_min=lo)
            args["sibling_lookup"] = _bool(value, "sibling_lookup", cls.sibling_lookup)
        else:
            for key in ("prompt_lookup_max", "prompt_lookup_min", "sibling_lookup"):
                if key in value:
                    raise InvalidParameterError(f"{_FIELD}.{key}", "is only for method ngram")
            model = value.get("model")
            if isinstance(model, os.PathLike):
                model = os.fspath(model)
            if not isinstance(model, str) or not model:
                raise InvalidParameterError(f"{_FIELD}.model", "is required for method draft_model: a checkpoint path")
            args["model"] = model
        args["adaptive"] = _bool(value, "adaptive", cls.adaptive)
        return cls(**args)


def _int(value: dict, key: str, lo: int, hi: int, default: int | None = None) -> int:
    x = value.get(key, default)
    if isinstance(x, bool) or not isinstance(x, numbers.Integral):
        raise InvalidParameterError(f"{_FIELD}.{key}", f"must be an int, got {x!r}")
    if not lo <= x <= hi:
        raise InvalidParameterError(f"{_FIELD}.{key}", f"must be in [{lo}, {hi}], got {x}")
    return int(x)


def _bool(value: dict, key: str, default: bool) -> bool:
    x = value.get(key, default)
    if not isinstance(x, bool):
        raise InvalidParameterError(f"{_FIELD}.{key}", f"must be true or false, got {x!r}")
    return x
