"""Compile settings, in one place. Hands back callables; never rebinds globals."""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
from torch import Tensor

log = logging.getLogger(__name__)


def decode_step(model, cache, tokens: Tensor) -> Tensor:
    """One decode step for every sample row: tokens [S] -> logits [S, V].

    Shapes are static (S rows, fixed cache sizes); positions and lengths are tensors in the cache,
    so one compiled graph serves every step.
    """
    positions = cache.positions()  # [S]
    return model(tokens.unsqueeze(1), positions.unsqueeze(1), cache)  # [S, 1] -> [S, V]


def make_sample_fn(compile: bool) -> Callable:
    """`sampling.sample` (counter-based noise, race, log probs), compiled when asked.

    Only the draw is compiled: its hash over [S, V] is most of the sampling time in eager mode
    (~20 ms at S=64, V=32000 on 2 cores, ~4.5 compiled). `process_logits` stays eager: inductor's
    CPU sort made top-p slower (measured 102 ms eager vs 272 compiled at S=64, V=32000).
    """
    from .sampling import sample

    return torch.compile(sample, fullgraph=True, dynamic=False) if compile else sample


def make_decode_fn(model, cache, compile: bool) -> Callable[[Tensor], Tensor]:
    """The decode step bound to a model and cache, compiled (fullgraph, static shapes) when asked."""
    fn = decode_step
    if compile:
        mode = None
        if cache.device.type == "cuda":
            mode = "reduce-overhead"  # CUDA graphs; the cache is updated in place at fixed addresses
            for t in cache.state_tensors():
                torch._dynamo.mark_static_address(t)
        fn = torch.compile(decode_step, fullgraph=True, dynamic=False, mode=mode)
        log.info("decode step compiled with torch.compile(fullgraph=True, mode=%s)", mode)
    return lambda tokens: fn(model, cache, tokens)
