"""forklm: many samples from one prompt, fast (bifurcated attention over a shared prompt KV cache).

The names below are imported on first use (PEP 562): `import forklm.cli` or `forklm.errors` does not
import torch, so `forklm --help` and bad arguments answer at once.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "LLM": ".api",
    "SamplingParams": ".sampling",
    "RequestOutput": ".outputs",
    "CompletionOutput": ".outputs",
    "Logprob": ".outputs",
    "ForklmError": ".errors",
    "InvalidParameterError": ".errors",
    "ContextLengthError": ".errors",
    "CapacityError": ".errors",
    "CheckpointError": ".errors",
    "ModelNotAvailableError": ".errors",
    "TokenizerError": ".errors",
    "UnsupportedModelError": ".errors",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    raise AttributeError(f"module 'forklm' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
