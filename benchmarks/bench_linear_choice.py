"""The per-host kernel choice for low-precision linears (`forklm.linear_choice`), measured on the
embedded SmolLM2-135M's linear shapes in each dtype: one pass over the model's 211 linears per row
count and kernel (int4 weights in groups of 32, int8 weights with a scale per row, float16 weights, the
dtype's dense kernel), and the menus `LowPrecisionLinear` would run: for weights on a 4-bit grid (a
GGUF file's Q4_1 blocks: int4 or dense) and for other low-precision ones (int8, float16 or dense). It is the same measurement `LLM(dtype="auto")` makes once
per host (and caches); this script always measures afresh and never writes the cache.

    python benchmarks/bench_linear_choice.py --out benchmarks/results/linear_choice_avx512bf16
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch

import report
from forklm.cpu_linear import describe_kernels, kernels_available
from forklm.linear_choice import PROBE_ROWS, kernels_from, measure

# SmolLM2-135M: 30 layers of q, o [576, 576], k, v [192, 576], gate, up [1536, 576], down [576, 1536];
# the LM head tied to the embedding [49152, 576]
SMOLLM2 = {(576, 576): 60, (192, 576): 60, (1536, 576): 60, (576, 1536): 30, (49152, 576): 1}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--out", default="benchmarks/results/linear_choice")
    args = ap.parse_args()
    res = {"command": report.command(), "host": report.host(), "rows": list(PROBE_ROWS), "dtypes": {}}
    table, series = [], []
    for name in args.dtypes.split(","):
        dtype = getattr(torch, name)
        load = os.getloadavg()[0]
        grid, other = kernels_available(dtype, int4_grid=True), kernels_available(dtype)
        choice = measure(SMOLLM2, dtype, tuple(dict.fromkeys(grid + other)), reps=args.reps)
        menus = {"grid": kernels_from({k: choice.ms[k] for k in grid}),
                 "other": kernels_from({k: choice.ms[k] for k in other})}
        res["dtypes"][name] = {"ms": choice.ms, "kernels": menus, "load_before": load, "load_after": choice.loadavg,
                               "menu": {g: describe_kernels(m) for g, m in menus.items()}}
        print(f"{name}: 4-bit grid: {describe_kernels(menus['grid'])}; other: {describe_kernels(menus['other'])}  "
              f"(load {load:.2f} -> {choice.loadavg:.2f})")
        for i, rows in enumerate(PROBE_ROWS):
            cells = {k: choice.ms[k][i] for k in choice.ms}
            print(f"  M={rows:4}  " + "  ".join(f"{k} {v:8.2f} ms" for k, v in cells.items()))
            table.append({"dtype": name, "rows": rows, **{k: f"{cells[k]:.2f}" if k in cells else "-"
                                                          for k in ("int4", "int8", "fp16", "dense")},
                          **{f"chosen_{g}": next((k for r, k in m if rows <= r), m[-1][1]) for g, m in menus.items()}})
        for k, ms in choice.ms.items():
            series.append((f"{name} {k}", list(PROBE_ROWS), list(ms), "o-"))
    out = Path(args.out)
    report.write(out, res, "Low-precision linear kernels per row count, SmolLM2-135M shapes",
                 "One pass over the model's 211 linears, ms (best of the reps, kernels alternating); "
                 "chosen: the kernel `LowPrecisionLinear` runs at that row count, for weights on a 4-bit grid "
                 "(a GGUF file's Q4_1 blocks) and for other low-precision weights.",
                 [("dtype", "dtype", "{}"), ("rows", "rows", "{}"), ("int4 ms", "int4", "{}"), ("int8 ms", "int8", "{}"),
                  ("fp16 ms", "fp16", "{}"), ("dense ms", "dense", "{}"),
                  ("chosen, 4-bit grid", "chosen_grid", "{}"), ("chosen, other", "chosen_other", "{}")], table)
    report.plot(out.with_suffix(".png"), series, "rows per call", "ms per pass over the linears",
                "SmolLM2-135M linears per kernel")
    print(f"wrote {out}.json, .md, .png")


if __name__ == "__main__":
    main()
