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


def bucket(x: int) -> int:
    """The smallest of 1, 2, 3, 4, 6, 8, 12, 16, 24, ... (2^k and 3 * 2^k) that is >= x.

    Compiled engines are sized to buckets so that calls of nearby sizes reuse one graph instead of
    compiling again (tens of seconds each on a small CPU); the padding costs at most 50% of a dimension.
    """
    if x <= 2:
        return max(x, 1)
    p = 1 << (x - 1).bit_length()  # the power of two >= x
    return 3 * p // 4 if 3 * p // 4 >= x else p


def with_eager_fallback(compiled: Callable, eager: Callable, name: str) -> Callable:
    """`compiled`, falling back to `eager` for good once torch.compile refuses to recompile.

    Each engine shape (prompt length, samples, ...) is a new graph of the same function; past
    dynamo's recompile limit (8) the compiled call raises instead of running.
    """
    state = {"fn": compiled}

    def call(*args):
        try:
            return state["fn"](*args)
        except torch._dynamo.exc.FailOnRecompileLimitHit:
            log.warning("%s: torch.compile recompile limit reached; running eagerly from now on", name)
            state["fn"] = eager
            return eager(*args)

    return call


def make_sample_fn(compile: bool) -> Callable:
    """`sampling.sample` (counter-based noise, race, log probs), compiled when asked.

    Only the draw is compiled: its hash over [S, V] is most of the sampling time in eager mode
    (~20 ms at S=64, V=32000 on 2 cores, ~4.5 compiled). `process_logits` stays eager: inductor's
    CPU sort made top-p slower (measured 102 ms eager vs 272 compiled at S=64, V=32000).
    """
    from .sampling import sample

    if not compile:
        return sample
    return with_eager_fallback(torch.compile(sample, fullgraph=True, dynamic=False), sample, "sampler")


def make_decode_fn(model, cache, compile: bool) -> Callable[[Tensor], Tensor]:
    """The decode step bound to a model and cache, compiled (fullgraph, static shapes) when asked.

    Before each step the cache's attention window is set (`set_window`), except under CUDA graphs,
    whose shapes stay static (the window is then the whole capacity)."""
    fn, windowed = decode_step, True
    if compile:
        mode = None
        if cache.device.type == "cuda":
            mode = "reduce-overhead"  # CUDA graphs; the cache is updated in place at fixed addresses
            for t in cache.state_tensors():
                torch._dynamo.mark_static_address(t)
            windowed = False
        fn = with_eager_fallback(
            torch.compile(decode_step, fullgraph=True, dynamic=False, mode=mode), decode_step, "decode step"
        )
        log.info("decode step compiled with torch.compile(fullgraph=True, mode=%s)", mode)
    if windowed:
        return lambda tokens: fn(model, set_window(cache), tokens)
    return lambda tokens: fn(model, cache, tokens)


def set_window(cache):
    """Set `cache.window_marker` to a tensor whose size is the attention window of the coming step.
    Compiled, that size is a dynamic dimension, so one graph serves every window; it is at least 2
    (sizes 0 and 1 would be specialized) unless the capacity is smaller."""
    size = min(max(cache.next_window(), 2), cache.capacity())
    marker = torch.empty(size, device=cache.device)  # [w]; only its size is read
    # "maybe": the graph may still specialize a value (e.g. the full capacity, where the slice is the
    # whole buffer), which then gets a graph of its own instead of an error
    torch._dynamo.maybe_mark_dynamic(marker, 0)
    cache.window_marker = marker
    return cache
