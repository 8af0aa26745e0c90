"""Which CPU kernel runs low-precision linears on this host, measured once and cached on disk.

Hosts differ: on the 2-core AVX2 EPYC, fbgemm's float16-weight GEMM ran SmolLM2's linears faster
than oneDNN's packed float32 at few rows and slower at many (benchmarks/results/cpu_linear_fp16*);
other CPUs move the crossover or remove it. So `choose_fp16_max_rows` times both
kernels on the model's own weight shapes at `PROBE_ROWS` and keeps the largest row count up to which
float16 stays ahead. The result is cached per (CPU model, instruction set, torch, threads, shapes)
in `cache_dir()` and reused by every later process; delete the file to measure again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .host import cpu_model

log = logging.getLogger(__name__)

PROBE_ROWS = (1, 2, 4, 8, 16, 32, 64, 256)
PROBE_BYTES = 32 << 20  # float32 weight bytes timed per distinct shape: enough to stream from memory
CACHE_VERSION = 1


@dataclass(frozen=True)
class LinearChoice:
    """fp16_max_rows: calls of at most this many rows run the float16 kernel (0: never);
    keep_fp32: some measured row count was faster in float32, so the packed float32 weight is kept.
    fp16_ms / fp32_ms: one pass over the model's linears per row count in PROBE_ROWS, as measured."""

    fp16_max_rows: int
    keep_fp32: bool
    fp16_ms: tuple[float, ...]
    fp32_ms: tuple[float, ...]
    loadavg: float


def cache_dir() -> Path:
    if os.environ.get("FORKLM_CACHE_DIR"):
        return Path(os.environ["FORKLM_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "forklm"


def host_key(shapes: dict[tuple[int, int], int]) -> dict:
    return {
        "version": CACHE_VERSION,
        "cpu": cpu_model(),
        "capability": torch.backends.cpu.get_cpu_capability(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "shapes": sorted([o, i, c] for (o, i), c in shapes.items()),
    }


def choose_fp16_max_rows(shapes: dict[tuple[int, int], int], directory: Path | None = None) -> LinearChoice:
    """The cached choice for these linear shapes ((out, in) -> count) on this host, measured if absent."""
    key = host_key(shapes)
    path = (directory or cache_dir()) / f"linear-choice-{hashlib.sha1(json.dumps(key).encode()).hexdigest()[:16]}.json"
    try:
        cached = json.loads(path.read_text())
        if cached["key"] == key:
            choice = cached["choice"]
            return LinearChoice(**{**choice, "fp16_ms": tuple(choice["fp16_ms"]), "fp32_ms": tuple(choice["fp32_ms"])})
    except (OSError, ValueError, KeyError, TypeError):
        pass
    start = time.perf_counter()
    choice = measure(shapes)
    log.info("measured this host's linear kernels in %.1f s: float16 weights up to %d rows (cached in %s)",
             time.perf_counter() - start, choice.fp16_max_rows, path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"key": key, "choice": asdict(choice)}, indent=1))
        tmp.replace(path)
    except OSError as e:
        log.warning("could not cache the linear kernel choice in %s (%s); it will be measured again", path, e)
    return choice


def fp16_max_rows_from(fp16_ms: Iterable[float], fp32_ms: Iterable[float]) -> tuple[int, bool]:
    """(largest row count of PROBE_ROWS up to which float16 is never slower, whether float32 ever won)."""
    best, fp32_won = 0, False
    for rows, a, b in zip(PROBE_ROWS, fp16_ms, fp32_ms):
        if a <= b and not fp32_won:
            best = rows
        elif a > b:
            fp32_won = True
    return best, fp32_won


@torch.inference_mode()
def measure(shapes: dict[tuple[int, int], int], reps: int = 5) -> LinearChoice:
    """Time one pass over the model's linears (each distinct shape timed on enough copies to stream
    from memory, scaled to its count) in both kernels at every row count of PROBE_ROWS."""
    from .cpu_linear import PACK_ROWS_HINT, fp16_linear_op, pack_fp16, packed_linear_op

    fp16_op, fp32_op = fp16_linear_op(), packed_linear_op()
    plan = []  # (in features, count scale, fp16 weights, fp32 weights)
    for (out, inp), count in shapes.items():
        copies = max(1, min(count, math.ceil(PROBE_BYTES / (4 * out * inp))))
        dense = [torch.randn(out, inp) * 0.02 for _ in range(copies)]
        plan.append((inp, out, count / copies, [pack_fp16(w) for w in dense],
                     [torch.ops.mkldnn._reorder_linear_weight(w, PACK_ROWS_HINT) for w in dense]))
        del dense
    fp16_ms, fp32_ms = [], []
    for rows in PROBE_ROWS:
        xs = {inp: torch.randn(rows, inp) for inp, *_ in plan}
        best16, best32 = [float("inf")] * len(plan), [float("inf")] * len(plan)
        for rep in range(reps + 1):  # the kernels alternate, so a busy moment slows both; rep 0 warms up
            for j, (inp, out, _, w16, w32) in enumerate(plan):
                x = xs[inp]
                t0 = time.perf_counter()
                for w in w16:
                    fp16_op(x, w, None, out)
                t1 = time.perf_counter()
                for w in w32:
                    fp32_op(x, w, None)
                t2 = time.perf_counter()
                if rep:
                    best16[j], best32[j] = min(best16[j], t1 - t0), min(best32[j], t2 - t1)
        fp16_ms.append(1e3 * sum(p[2] * t for p, t in zip(plan, best16)))
        fp32_ms.append(1e3 * sum(p[2] * t for p, t in zip(plan, best32)))
    max_rows, keep = fp16_max_rows_from(fp16_ms, fp32_ms)
    return LinearChoice(max_rows, keep, tuple(fp16_ms), tuple(fp32_ms), os.getloadavg()[0])


def prepare_cpu_linears(model: torch.nn.Module, low_precision: set[str], directory: Path | None = None) -> None:
    """Give every float32 linear of a CPU model its kernel, in place: the linears named in
    `low_precision` (values already low precision) run float16 weights up to this host's measured row
    crossover where that pays; every other float32 linear runs oneDNN-packed (cpu_linear.py)."""
    from .cpu_linear import fp16_weights_available, pack_linears, packing_available, should_pack, \
        use_low_precision_linears

    low = {n: m for n, m in model.named_modules() if n in low_precision and should_pack(m)}
    if low and fp16_weights_available() and packing_available():
        shapes: dict[tuple[int, int], int] = {}
        for m in low.values():
            shapes[(m.out_features, m.in_features)] = shapes.get((m.out_features, m.in_features), 0) + 1
        choice = choose_fp16_max_rows(shapes, directory)
        if choice.fp16_max_rows > 0:
            use_low_precision_linears(model, set(low), choice.fp16_max_rows, choice.keep_fp32)
    pack_linears(model)
