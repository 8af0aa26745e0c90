"""forklm: many samples from one prompt, fast (bifurcated attention over a shared prompt KV cache)."""

from .api import LLM
from .errors import (
    CapacityError,
    CheckpointError,
    ContextLengthError,
    ForklmError,
    InvalidParameterError,
    ModelNotAvailableError,
    TokenizerError,
    UnsupportedModelError,
)
from .outputs import CompletionOutput, Logprob, RequestOutput
from .sampling import SamplingParams

__all__ = [
    "LLM",
    "SamplingParams",
    "RequestOutput",
    "CompletionOutput",
    "Logprob",
    "ForklmError",
    "InvalidParameterError",
    "ContextLengthError",
    "CapacityError",
    "CheckpointError",
    "ModelNotAvailableError",
    "TokenizerError",
    "UnsupportedModelError",
]
