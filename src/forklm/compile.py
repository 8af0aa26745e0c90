"""Compile settings, in one place. Hands back callables; never rebinds globals."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

log = logging.getLogger(__name__)


def with_eager_fallback(compiled: Callable, eager: Callable, name: str) -> Callable:
    """`compiled`, falling back to `eager` for good once torch.compile refuses to recompile.

    A call whose shapes or branches the graphs so far do not cover compiles another one; past dynamo's
    recompile limit (8) the compiled call raises instead of running.
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


def graphs_compiled(compile: bool) -> int:
    """Graphs torch.compile has built in this process so far (0 when not compiling: no import of dynamo)."""
    if not compile:
        return 0
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


def make_sample_fn(compile: bool) -> Callable:
    """`sampling.sample` (counter-based noise, race, log probs), compiled when asked.

    Only the draw is compiled: its hash over [S, V] is most of the sampling time in eager mode
    (~20 ms at S=64, V=32000 on 2 cores, ~4.5 compiled). `process_logits` stays eager: inductor's
    CPU sort made top-p slower (measured 102 ms eager vs 272 compiled at S=64, V=32000).
    """
    from .sampling import sample

    if not compile:
        return sample
    # dynamic from the start: one graph for one row, one for every other row count (the batch follows the load)
    return with_eager_fallback(torch.compile(sample, fullgraph=True, dynamic=True), sample, "sampler")


def _first(model, block, tokens: Tensor, positions: Tensor):
    x, rope = model.embed(tokens, positions)  # [N, L] -> [N, L, E], rope
    return x, rope, block.attention_inputs(x, rope)  # q, k, v of the first layer


def _between(block, following, x: Tensor, o: Tensor, rope):
    x = block.finish(x, o)  # [N, L, E], [N, H, L, D] -> [N, L, E]
    return x, following.attention_inputs(x, rope)  # the following layer's q, k, v


def _last(model, block, x: Tensor, o: Tensor) -> Tensor:
    return model.head(block.finish(x, o)[:, -1])  # [N, L, E] -> [N, V]


@dataclass(frozen=True)
class LayerFns:
    """The model's step in pieces cut at attention, which runs between them, eagerly, on whatever the
    step plan holds: `first` (embedding and the first layer up to attention), `between` (the rest of
    one layer and the next one up to attention) and `last` (the rest of the last layer and the LM head on
    the last position). One call per layer: in eager mode the same operators as the layers' own forward;
    compiled, what each call of a compiled graph costs (its guards, its wrapper) is paid once per layer,
    not twice. The compiled pieces depend only on the batch, which follows the live rows: one graph
    serves one row, and one more every other row count (dynamo makes a size dynamic when it sees a second
    one above 1; a kernel menu's branch between row counts, or another thread count, adds one). A new
    prompt length, prefix tree or level count never recompiles them, and one graph of `between` serves
    every layer (parameters are graph inputs)."""

    first: Callable
    between: Callable
    last: Callable


def layer_fns(compile: bool) -> LayerFns:
    if not compile:
        return LayerFns(_first, _between, _last)

    def c(fn, name):
        return with_eager_fallback(torch.compile(fn, fullgraph=True), fn, name)

    log.info("decode step compiled with torch.compile(fullgraph=True), one piece per layer cut at attention")
    return LayerFns(c(_first, "embedding and first layer"), c(_between, "layer"), c(_last, "last layer and LM head"))
