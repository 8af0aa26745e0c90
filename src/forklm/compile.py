"""Compile settings, in one place. Hands back callables; never rebinds globals."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

log = logging.getLogger(__name__)


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


def _embed(model, tokens: Tensor, positions: Tensor):
    return model.embed(tokens, positions)  # [N, L] -> [N, L, E], rope


def _pre(block, x: Tensor, rope):
    return block.attention_inputs(x, rope)  # [N, L, E] -> q, k, v


def _post(block, x: Tensor, o: Tensor) -> Tensor:
    return block.finish(x, o)  # [N, L, E], [N, H, L, D] -> [N, L, E]


def _head(model, x: Tensor) -> Tensor:
    return model.head(x[:, -1])  # [N, L, E] -> [N, V]


@dataclass(frozen=True)
class LayerFns:
    """The model's step in four pieces around attention: embed, layer before attention, layer after
    attention, LM head on the last position. Attention itself runs between them, eagerly, on whatever
    the step plan holds, so the compiled pieces depend only on the batch size: a new prompt length,
    prefix tree or level count never recompiles them, and one graph of `pre` / `post` serves every
    layer (parameters are graph inputs)."""

    embed: Callable
    pre: Callable
    post: Callable
    head: Callable


def layer_fns(compile: bool) -> LayerFns:
    if not compile:
        return LayerFns(_embed, _pre, _post, _head)

    def c(fn, name):
        return with_eager_fallback(torch.compile(fn, fullgraph=True, dynamic=False), fn, name)

    log.info("decode step compiled with torch.compile(fullgraph=True) in four pieces around attention")
    return LayerFns(c(_embed, "embed"), c(_pre, "layer (pre-attention)"), c(_post, "layer (post-attention)"),
                    c(_head, "LM head"))
