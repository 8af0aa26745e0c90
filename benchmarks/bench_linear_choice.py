"""The per-host kernel choice for low-precision linears (`forklm.linear_choice`), measured on the
embedded SmolLM2-135M's linear shapes in each dtype, grouped as `LLM(dtype="auto")` groups them: the 120
linears of the layers (fused q/k/v, o, fused gate/up, down; a GGUF file's Q4_1 blocks, on a 4-bit grid:
int4 or the dense weights) and the LM head (Q8_0 values: int8, float16 or the dense weights). One pass
over a group per row count and kernel ("dense_pad": the dense weights with a call of fewer than 4 rows
padded to 4), and the menu `LowPrecisionLinear` would run. It is the measurement `LLM(dtype="auto")`
makes once per host (and caches); this script always measures afresh and never writes the cache.

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

# SmolLM2-135M: 30 layers of q/k/v [960, 576], o [576, 576], gate/up [3072, 576], down [576, 1536]; the LM
# head tied to the embedding [49152, 576]
GROUPS = {"layers": ({(960, 576): 30, (576, 576): 30, (3072, 576): 30, (576, 1536): 30}, True),
          "head": ({(49152, 576): 1}, False)}
KERNELS = ("int4", "int8", "fp16", "dense", "dense_pad")


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
        res["dtypes"][name] = {}
        for group, (shapes, grid) in GROUPS.items():
            load = os.getloadavg()[0]
            choice = measure(shapes, dtype, kernels_available(dtype, int4_grid=grid), reps=args.reps)
            menu = kernels_from(choice.ms)
            res["dtypes"][name][group] = {"ms": choice.ms, "kernels": menu, "load_before": load,
                                          "load_after": choice.loadavg, "menu": describe_kernels(menu)}
            print(f"{name} {group}: {describe_kernels(menu)}  (load {load:.2f} -> {choice.loadavg:.2f})")
            for i, rows in enumerate(PROBE_ROWS):
                cells = {k: choice.ms[k][i] for k in choice.ms}
                print(f"  M={rows:4}  " + "  ".join(f"{k} {v:8.2f} ms" for k, v in cells.items()))
                table.append({"dtype": name, "group": group, "rows": rows,
                              **{k: f"{cells[k]:.2f}" if k in cells else "-" for k in KERNELS},
                              "chosen": next((k for r, k in menu if rows <= r), menu[-1][1])})
            for k, ms in choice.ms.items():
                series.append((f"{name} {group} {k}", list(PROBE_ROWS), list(ms), "o-"))
    out = Path(args.out)
    report.write(out, res, "Low-precision linear kernels per row count, SmolLM2-135M shapes",
                 "One pass over a group of the model's linears, ms (best of the reps, kernels alternating, the "
                 "caches evicted before each pass); dense_pad at 4 rows and above is the dense kernel itself (not "
                 "timed again); chosen: the kernel `LowPrecisionLinear` runs at that row count.",
                 [("dtype", "dtype", "{}"), ("group", "group", "{}"), ("rows", "rows", "{}")]
                 + [(f"{k} ms", k, "{}") for k in KERNELS] + [("chosen", "chosen", "{}")], table)
    report.plot(out.with_suffix(".png"), series, "rows per call", "ms per pass over the linears",
                "SmolLM2-135M linears per kernel")
    print(f"wrote {out}.json, .md, .png")


if __name__ == "__main__":
    main()
