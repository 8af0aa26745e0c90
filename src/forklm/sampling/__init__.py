"""Sampling: request parameters, per-row tensors, logits processors, the sampler, beam search.

The engine's per-step path is `process_logits(logits, tensors, history)` then
`sample(processed, tensors, history)`, both vectorized over the rows of the batch.
"""

from forklm.sampling.beam import BeamSearchState, BeamStep
from forklm.sampling.params import SamplingParams
from forklm.sampling.processors import process_logits
from forklm.sampling.random import fresh_seed, uniform
from forklm.sampling.sampler import SampleResult, compute_logprobs, draw, sample, with_alternatives
from forklm.sampling.speculative import verify_draws
from forklm.sampling.tensors import RowSpec, SamplingTensors, TokenHistory

__all__ = [
    "BeamSearchState",
    "BeamStep",
    "RowSpec",
    "SampleResult",
    "SamplingParams",
    "SamplingTensors",
    "TokenHistory",
    "compute_logprobs",
    "draw",
    "fresh_seed",
    "process_logits",
    "sample",
    "uniform",
    "verify_draws",
    "with_alternatives",
]
