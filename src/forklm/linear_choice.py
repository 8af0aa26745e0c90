"""Which CPU kernel runs low-precision linears on this host, per row count, measured once and cached.

Hosts differ: on the 2-core AVX2 EPYC, fbgemm's float16-weight GEMM ran SmolLM2's linears faster
than oneDNN's packed float32 at few rows and slower at many (benchmarks/results/cpu_linear_fp16*);
on the AVX512-BF16 EPYC, `_weight_int8pack_mm` on int8 weights with bfloat16 activations was the
fastest at 1-8 rows and the slowest at 64 (benchmarks/results/linear_choice_avx512bf16.md). So
`choose_kernels` times every kernel `cpu_linear.kernels_available` offers for the model's dtype on
the model's own weight shapes at each of `PROBE_ROWS`, and keeps, per row count, the fastest (the
model's own "dense" kernel unless another beats it by `MARGIN`; a kernel never `MARGIN` ahead of the
other kept ones is dropped, as each holds its own copy of the weights; "dense_pad", the dense weights
run with a few-row call padded to `cpu_linear.PAD_ROWS` rows, holds none, and replaces "dense" where it
is `SHARED_MARGIN` faster). The result is cached per (CPU
model, instruction set, torch, threads, dtype, shapes) in `cache_dir()` and reused by every later
process, unless other processes kept busy more cores than the probe's threads left free (plus
`BUSY_CORES`); delete the file to measure again."""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .host import OthersMeter, cache_dir, cpu_model, write_cache_file

log = logging.getLogger(__name__)

PROBE_ROWS = (1, 2, 4, 8, 16, 32, 64, 256)
PROBE_BYTES = 32 << 20  # float32 weight bytes timed per distinct shape
# read before every timed pass, so that the weights come from memory as in a step (which streams far more
# than the last-level cache; a probe on cache-resident weights timed int4 and int8 alike, while streamed
# int4 ran 2x as fast: cpu_linear.py)
EVICT_BYTES = 64 << 20
# another kernel replaces "dense" at a row count only when this much faster: each kept kernel holds one more
# copy of its weights (the embedded model's head: fp16 5% ahead of dense at one row held 57 MB more; a few
# percent is also within what a probe's repeats vary by)
MARGIN = 0.15
# a kernel that runs the dense kernel's own weights (cpu_linear.SHARES_WEIGHTS: no copy to hold) replaces it at a
# row count when this much faster: a margin only against the probe's repeats varying
SHARED_MARGIN = 0.05
BUSY_CORES = 0.3  # other processes using this many more cores than our threads left free: a probe not cached
CACHE_VERSION = 7


@dataclass(frozen=True)
class LinearChoice:
    """kernels: ((max_rows, kernel name), ...) for `cpu_linear.LowPrecisionLinear`; ms: one pass over
    the model's low-precision linears, per kernel, at each row count of PROBE_ROWS, as measured."""

    kernels: tuple[tuple[int, str], ...]
    ms: dict[str, tuple[float, ...]]
    loadavg: float

    @property
    def only_dense(self) -> bool:
        return all(k == "dense" for _, k in self.kernels)


def host_key(shapes: Mapping[tuple[int, int], int], dtype: torch.dtype, kernels: Sequence[str]) -> dict:
    return {
        "version": CACHE_VERSION,
        "cpu": cpu_model(),
        "capability": torch.backends.cpu.get_cpu_capability(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "dtype": str(dtype).removeprefix("torch."),
        "kernels": list(kernels),
        "shapes": sorted([o, i, c] for (o, i), c in shapes.items()),
    }


def choose_kernels(shapes: Mapping[tuple[int, int], int], dtype: torch.dtype,
                   directory: Path | None = None, int4_grid: bool = False) -> LinearChoice:
    """The cached choice for these linear shapes ((out, in) -> count) in `dtype` on this host,
    measured if absent; `int4_grid`: their weights are on a 4-bit grid (`cpu_linear.on_int4_grid`),
    so the int4 kernel is offered."""
    from .cpu_linear import kernels_available

    names = kernels_available(dtype, int4_grid)
    key = host_key(shapes, dtype, names)
    path = (directory or cache_dir()) / f"linear-choice-{hashlib.sha1(json.dumps(key).encode()).hexdigest()[:16]}.json"
    try:
        cached = json.loads(path.read_text())
        if cached["key"] == key:
            c = cached["choice"]
            return LinearChoice(tuple((int(r), str(k)) for r, k in c["kernels"]),
                                {k: tuple(v) for k, v in c["ms"].items()}, float(c["loadavg"]))
    except (OSError, ValueError, KeyError, TypeError):
        pass
    if names == ("dense",):
        return LinearChoice(((PROBE_ROWS[-1], "dense"),), {}, os.getloadavg()[0])
    start, others = time.perf_counter(), OthersMeter().start()
    choice = measure(shapes, dtype, names)
    busy = others.cores()
    log.info("measured this host's %s linear kernels in %.1f s: %s", key["dtype"], time.perf_counter() - start,
             choice.kernels)
    if busy > spare_cores() + BUSY_CORES:  # they took cores the probe's threads ran on
        log.warning("other processes kept %.1f cores busy while the linear kernels were measured: the choice is "
                    "used now but not cached, so the next start measures again", busy)
        return choice
    try:
        write_cache_file(path, json.dumps({"key": key, "choice": asdict(choice)}, indent=1))
    except OSError as e:
        log.warning("could not cache the linear kernel choice in %s (%s); it will be measured again", path, e)
    return choice


def spare_cores() -> int:
    """Cores this process may run on beyond its torch threads: other processes can use these without
    slowing a measurement."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    return max(0, cores - torch.get_num_threads())


def kernels_from(ms: Mapping[str, Sequence[float]]) -> tuple[tuple[int, str], ...]:
    """((max_rows, name), ...): at each row count of PROBE_ROWS the fastest kernel, the dense weights'
    ("dense", or "dense_pad" where that is SHARED_MARGIN faster) unless another is more than MARGIN faster
    than them; a kernel with weights of its own is kept only where it is more than MARGIN faster than
    every other kept one at some row count (each such kernel holds its own copy of the weights);
    neighbouring row counts with one kernel merged."""
    from .cpu_linear import SHARES_WEIGHTS

    kept = [k for k in ms if SHARES_WEIGHTS.get(k) in (None, *ms)]  # a sharer only beside the kernel it shares

    def on_dense(i: int) -> str:  # the faster way to run the dense weights at row count i
        pad = next((k for k in kept if SHARES_WEIGHTS.get(k) == "dense"), None)
        return pad if pad and ms[pad][i] < (1 - SHARED_MARGIN) * ms["dense"][i] else "dense"

    while True:
        winners = []
        for i in range(len(PROBE_ROWS)):
            best = min(kept, key=lambda k: ms[k][i])
            if "dense" in kept and (best == "dense" or best in SHARES_WEIGHTS
                                    or ms[best][i] > (1 - MARGIN) * ms[on_dense(i)][i]):
                best = on_dense(i)
            winners.append(best)
        needless = [k for k in kept if k != "dense" and k not in SHARES_WEIGHTS and len(kept) > 1 and not any(
            w == k and ms[k][i] < (1 - MARGIN) * min(ms[o][i] for o in kept if o != k)
            for i, w in enumerate(winners))]
        if not needless:
            break
        kept.remove(needless[0])
    out: list[tuple[int, str]] = []
    for rows, best in zip(PROBE_ROWS, winners):
        if out and out[-1][1] == best:
            out[-1] = (rows, best)
        else:
            out.append((rows, best))
    return tuple(out)


@torch.inference_mode()
def measure(shapes: Mapping[tuple[int, int], int], dtype: torch.dtype, names: Sequence[str],
            reps: int = 5) -> LinearChoice:
    """Time one pass over the model's linears (each distinct shape timed on up to PROBE_BYTES of copies,
    scaled to its count, with the caches evicted before each timed pass: from memory, as in a step) in
    every kernel at every row count of PROBE_ROWS, through `LowPrecisionLinear` itself: what is timed
    is what runs."""
    from .cpu_linear import PAD_ROWS, LowPrecisionLinear

    plan = []  # (in features, count scale, {kernel: LowPrecisionLinears running only that kernel})
    for (out, inp), count in shapes.items():
        copies = max(1, min(count, math.ceil(PROBE_BYTES / (4 * out * inp))))
        dense = [torch.nn.Linear(inp, out, bias=False, dtype=dtype) for _ in range(copies)]
        for lin in dense:  # values on a 4-bit grid (each group of 32 spans codes 0..15), as int4 is offered for
            codes = torch.randint(0, 16, (out, inp), dtype=torch.int8)  # int8: a 49152-row head stays small
            codes[:, ::32], codes[:, 1::32] = 0, 15
            with torch.no_grad():
                lin.weight.copy_(codes.to(dtype).sub_(8).mul_(0.005))
        plan.append((inp, count / copies, {k: [LowPrecisionLinear(lin, ((PROBE_ROWS[-1], k),)) for lin in dense]
                                           for k in names}))
        del dense
    ms: dict[str, list[float]] = {k: [] for k in names}
    evict = torch.ones(max(EVICT_BYTES, 2 * _last_level_cache_bytes()) // 4)
    for rows in PROBE_ROWS:
        xs = {inp: torch.randn(rows, inp).to(dtype) for inp, *_ in plan}
        best = {k: [math.inf] * len(plan) for k in names}
        # "dense_pad" pads only calls of fewer than PAD_ROWS rows: above, it is the dense kernel itself
        timed = [k for k in names if not (k == "dense_pad" and rows >= PAD_ROWS and "dense" in names)]
        for rep in range(reps + 1):  # the kernels alternate, so a busy moment slows all; rep 0 warms up
            for j, (inp, _, linears) in enumerate(plan):
                for k in timed:
                    evict.sum()  # the caches now hold this buffer, not the weights
                    t0 = time.perf_counter()
                    for lin in linears[k]:
                        lin(xs[inp])
                    if rep:
                        best[k][j] = min(best[k][j], time.perf_counter() - t0)
        for k in names:
            ms[k].append(1e3 * sum(p[1] * t for p, t in zip(plan, best[k if k in timed else "dense"])))
    return LinearChoice(kernels_from(ms), {k: tuple(v) for k, v in ms.items()}, os.getloadavg()[0])


def prepare_cpu_linears(model: torch.nn.Module, low_precision: set[str], directory: Path | None = None) -> None:
    """Give every linear of a CPU model its kernel, in place: the float32 or bfloat16 linears named in
    `low_precision` (values already low precision) run this host's measured kernels per row count
    ("dense" unless another beats it); every other float32 linear runs oneDNN-packed (cpu_linear.py)."""
    from .cpu_linear import (INT4_KERNELS, KERNELS, is_cpu_linear, on_int4_grid, pack_linears, packing_available,
                             use_low_precision_linears)

    # (dtype, on a 4-bit grid) -> the linears' names and shape counts; no module references kept: see below
    groups: dict[tuple[torch.dtype, bool], tuple[set[str], dict[tuple[int, int], int]]] = {}
    for name, m in model.named_modules():
        if name in low_precision and is_cpu_linear(m) and m.weight.dtype in KERNELS:
            grid = m.weight.dtype in INT4_KERNELS and on_int4_grid(m.weight)
            names, counts = groups.setdefault((m.weight.dtype, grid), (set(), {}))
            names.add(name)
            counts[(m.out_features, m.in_features)] = counts.get((m.out_features, m.in_features), 0) + 1
    for (dtype, grid), (names, counts) in groups.items():
        if dtype == torch.float32 and not packing_available():
            continue
        choice = choose_kernels(counts, dtype, directory, int4_grid=grid)
        # what was measured as "dense" is LowPrecisionLinear's (oneDNN-packed where torch has it; a plain
        # bfloat16 nn.Linear took 1.6x as long on the embedded model's head at one row); float32 ones are
        # packed alike by pack_linears below. Swapped module by module: old weights go as new ones come
        if not (choice.only_dense and dtype == torch.float32):
            use_low_precision_linears(model, names, choice.kernels, dtype)
    pack_linears(model)


def _last_level_cache_bytes() -> int:
    try:
        return max(0, os.sysconf("SC_LEVEL3_CACHE_SIZE"))
    except (ValueError, OSError):
        return 0
