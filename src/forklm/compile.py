"""Compile settings, in one place. Hands back callables; never rebinds globals (inductor's own config
aside: `settle_cpu_vec_isa` answers one of its questions from what an earlier process found)."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import subprocess
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from .host import cache_dir, write_cache_file

log = logging.getLogger(__name__)


def settle_cpu_vec_isa() -> None:
    """Spare each process inductor's probe of the CPU's SIMD instruction sets, and probe only the one it
    would pick.

    inductor's C++ backend checks every instruction set the CPU flags name (AVX-512 VNNI, AVX-512, AVX2)
    by building a test library with each (once per inductor cache folder: ~7.5 s for three on the 2-core
    host) and loading each in a child process (in every process: ~0.8 s of a 4 s warm start there), then
    uses the first that passed, or the first named by `ATEN_CPU_CAPABILITY`. Only that one matters:
    forklm checks it alone (~2.8 s), through inductor's own check, and keeps the verdict in its cache
    under the CPU flags, the variable, the C++ compiler and torch. When it passed, inductor's own
    `config.cpp.vec_isa_ok` is set, which skips the probe and picks that same instruction set; it is set
    in the process that ran the check too, as that setting is part of the compiled graphs' cache keys.
    When it failed, or anything is unexpected (another torch's internals, no compiler), inductor probes
    as it does."""
    try:
        from torch._inductor import config as inductor_config
        from torch._inductor import cpu_vec_isa
        from torch._inductor.cpp_builder import get_cpp_compiler

        if inductor_config.cpp.vec_isa_ok is not None or platform.machine() not in ("x86_64", "AMD64"):
            return
        flags = cpu_vec_isa.x86_isa_checker()
        candidates = [isa for isa in cpu_vec_isa.supported_vec_isa_list
                      if all(f in flags for f in str(isa).split())]
        capability = os.environ.get("ATEN_CPU_CAPABILITY")
        if not candidates or capability == "default":
            return
        chosen = cpu_vec_isa.get_isa_from_cpu_capability(capability, candidates, cpu_vec_isa.invalid_vec_isa)
        compiler = get_cpp_compiler()
        version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=30).stdout
        key = {"candidates": [str(isa) for isa in candidates], "chosen": str(chosen), "capability": capability,
               "compiler": compiler, "version": version.splitlines()[:1], "torch": torch.__version__}
    except Exception as exc:  # noqa: BLE001 - any failure: inductor probes as usual
        log.debug("inductor's vector ISA probe left as it is: %s", exc)
        return
    path = cache_dir() / f"inductor-vec-isa-{hashlib.sha1(json.dumps(key).encode()).hexdigest()[:16]}.json"
    try:
        entry = json.loads(path.read_text())
        ok = entry["ok"] if entry["key"] == key else None
    except (OSError, ValueError, KeyError, TypeError):
        ok = None
    if ok is None:
        ok = bool(chosen)  # inductor's own check of this one instruction set (vec_isa_ok is None here)
        try:
            write_cache_file(path, json.dumps({"key": key, "ok": ok}))
        except OSError:
            pass
    if ok:
        inductor_config.cpp.vec_isa_ok = True


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

    Only the draw and the chosen tokens' log probs are compiled (`sampling.draw`): its hash over [S, V]
    is most of the sampling time in eager mode (~20 ms at S=64, V=32000 on 2 cores, ~4.5 compiled). The
    top alternatives a request asks for run eagerly after it, so that another K is no other graph.
    `process_logits` stays eager: inductor's CPU sort made top-p slower (measured 102 ms eager vs 272
    compiled at S=64, V=32000).
    """
    from .sampling import draw, sample, with_alternatives

    if not compile:
        return sample
    settle_cpu_vec_isa()
    # dynamic from the start: one graph for one row, one for every other row count (the batch follows the load)
    compiled = with_eager_fallback(torch.compile(draw, fullgraph=True, dynamic=True), draw, "sampler")

    def compiled_sample(logits: Tensor, t, h):
        return with_alternatives(logits, *compiled(logits, t, h), t.max_logprobs)

    return compiled_sample


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
    serves one row, and one more every other row count (`_batch_dynamic`; a kernel menu's branch between
    row counts, or another thread count, adds one: `Engine.warm_up` compiles them all up front). A new
    prompt length, prefix tree or level count never recompiles them, and one graph of `between` serves
    every layer (parameters are graph inputs)."""

    first: Callable
    between: Callable
    last: Callable


def _batch_dynamic(fn: Callable) -> Callable:
    """`fn` with the batch (dim 0 of its tensor arguments, rope's tables included) marked dynamic from
    the second row on: one graph for one row and one for every other row count (per branch of the
    linears' kernel menus), compiled at the first call of each, instead of a static graph at the first
    size and a dynamic one at the second."""
    def call(*args):
        if args[2].shape[0] > 1:  # every piece's third argument is the batch's tokens or hidden states
            for a in args:
                for t in a if isinstance(a, tuple) else (a,):
                    if isinstance(t, Tensor):
                        torch._dynamo.maybe_mark_dynamic(t, 0)
        return fn(*args)

    return call


def layer_fns(compile: bool) -> LayerFns:
    if not compile:
        return LayerFns(_first, _between, _last)
    settle_cpu_vec_isa()

    def c(fn, name):
        return with_eager_fallback(_batch_dynamic(torch.compile(fn, fullgraph=True)), fn, name)

    log.info("decode step compiled with torch.compile(fullgraph=True), one piece per layer cut at attention")
    return LayerFns(c(_first, "embedding and first layer"), c(_between, "layer"), c(_last, "last layer and LM head"))
