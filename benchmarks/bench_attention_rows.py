"""The CPU flash kernel at decode by query rows per kv head: one call per layer over a segment every row
reads to its end (the n=1 step's only level; a sample pool row's own tokens), `aten._scaled_dot_product_
flash_attention_for_cpu` as it is ("kernel") against forklm's `attention` (which adds a zero row to one
bfloat16 / float16 row, and to three over 1024 keys or more: `attention/ops.py`'s `_even_rows`). 30 layers' distinct
caches, 3 kv heads of dim 64 (SmolLM2), so that K/V come from memory as in a step.

    python benchmarks/bench_attention_rows.py --out benchmarks/results/attention_rows_avx512bf16

Writes OUT.json, OUT.md (the table) and OUT.png (us per layer against rows, per dtype, L and path).
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import time
from pathlib import Path

import torch

import report
from forklm.attention.ops import attention

HKV, D, LAYERS = 3, 64, 30


def per_layer_us(fns, caches, reps: int) -> list[float]:
    """Per function: the median over `reps` passes of the layers, divided by their count; the functions take
    turns pass by pass, so that a busy moment of the host falls on each alike."""
    for fn in fns:
        for k, v in caches:
            fn(k, v)
    times = [[] for _ in fns]
    for _ in range(reps):
        for fn, ts in zip(fns, times):
            t = time.perf_counter()
            for k, v in caches:
                fn(k, v)
            ts.append((time.perf_counter() - t) / len(caches))
    return [1e6 * statistics.median(ts) for ts in times]


@torch.inference_mode()
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", default="1,2,3,4,5,6,7,8,9,12")
    ap.add_argument("--lens", default="256,512,1024,2048")
    ap.add_argument("--dtypes", default="bfloat16,float32")
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--out", default="benchmarks/results/attention_rows")
    args = ap.parse_args()
    rows_list = [int(r) for r in args.rows.split(",")]
    res = {"command": report.command(), "host": report.host(), "cells": []}
    table, series = [], []
    scale = 1 / math.sqrt(D)
    kernel = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    for name in args.dtypes.split(","):
        dtype = getattr(torch, name)
        for L in (int(x) for x in args.lens.split(",")):
            torch.manual_seed(L)
            caches = [(torch.randn(1, HKV, L, D).to(dtype), torch.randn(1, HKV, L, D).to(dtype)) for _ in range(LAYERS)]
            line = {"kernel": [], "forklm": []}
            for m in rows_list:
                q = torch.randn(1, HKV, m, D).to(dtype)
                load = os.getloadavg()[0]
                raw, ours = per_layer_us([lambda k, v: kernel(q, k, v, scale=scale),
                                          lambda k, v: attention(q, k, v, scale)], caches, args.reps)
                cell = {"dtype": name, "L": L, "rows": m, "kernel_us": raw, "forklm_us": ours, "load": load}
                res["cells"].append(cell)
                table.append({**cell, "ratio": raw / ours})
                line["kernel"].append(raw)
                line["forklm"].append(ours)
                print(f"{name} L={L} rows={m}: kernel {raw:7.1f} us, forklm {ours:7.1f} us per layer (load {load:.2f})",
                      flush=True)
            for path, ys in line.items():
                series.append((f"{name} L={L} {path}", rows_list, ys, "o-" if path == "forklm" else "x--"))
    out = Path(args.out)
    report.write(out, res, "CPU flash attention at decode by query rows per kv head",
                 "us per layer (median of the reps over 30 layers' distinct caches, the two paths taking turns, 3 kv heads, dim 64, every key "
                 "valid): the kernel as it is, and forklm's `attention` (1 bf16/fp16 row, and 3 over 1024 keys or "
                 "more, run with a zero row more); kernel / forklm > 1: forklm's call is faster.",
                 [("dtype", "dtype", "{}"), ("L", "L", "{}"), ("rows", "rows", "{}"), ("kernel us", "kernel_us", "{:.1f}"),
                  ("forklm us", "forklm_us", "{:.1f}"), ("kernel / forklm", "ratio", "{:.2f}"), ("load", "load", "{:.2f}")],
                 table)
    report.plot(out.with_suffix(".png"), series, "query rows per kv head", "us per layer",
                "CPU flash attention at decode")
    print(f"wrote {out}.json, .md, .png")


if __name__ == "__main__":
    main()
