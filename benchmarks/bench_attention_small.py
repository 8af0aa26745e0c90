"""Many small attention problems, as the sample pool's level of a decode step poses them at large n: B rows
x Hkv kv heads, each M query rows against that row's own L keys (the tokens it generated), a row one key
short so that a mask is needed. The CPU flash kernel (`_cpu_flash_with_lse`) against float32 batched GEMMs
(`_cpu_gemm_with_lse`) and the float32 matmul reference (`attention_with_lse_reference`), the functions
forklm's `attention_with_lse` picks between (`attention/ops.py`'s `_fast_path`). 30 layers' distinct
buffers, so that K/V come from memory as in a step.

    python benchmarks/bench_attention_small.py --out benchmarks/results/attention_small_avx512bf16

Writes OUT.json, OUT.md (the table: us per layer, and flash / gemm) and OUT.png.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import torch

import report
from forklm.attention.ops import (_CPU_GEMM_KEYS, _CPU_GEMM_MAX_KEY_ROWS, _CPU_GEMM_MIN_PROBLEMS, _cpu_flash_with_lse,
                                  _cpu_gemm_with_lse, _fast_path, attention_with_lse_reference, key_mask)

D, LAYERS = 64, 30
ARMS = {"flash": _cpu_flash_with_lse, "gemm": _cpu_gemm_with_lse, "reference": None}


def per_layer_us(arms: dict, layers: list, reps: int) -> dict[str, float]:
    """Per arm: the median over `reps` passes of the layers, divided by their count; the arms take turns
    pass by pass, so that a busy moment of the host falls on each alike."""
    def run(fn):
        for q, k, v, valid, mask in layers:
            if fn is None:
                attention_with_lse_reference(q, k, v, valid, 0.125)
            else:
                fn(q, k, v, valid, 0.125, mask)

    for fn in arms.values():
        run(fn)
    times = {name: [] for name in arms}
    for _ in range(reps):
        for name, fn in arms.items():
            t = time.perf_counter()
            run(fn)
            times[name].append((time.perf_counter() - t) / len(layers))
    return {name: 1e6 * statistics.median(ts) for name, ts in times.items()}


@torch.inference_mode()
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", default="16,32,64,128,256", help="B")
    ap.add_argument("--heads", default="3x3,2x4,8x1", help="Hkv x M (query rows per kv head)")
    ap.add_argument("--keys", default="1,8,32,64,96,128", help="L")
    ap.add_argument("--dtypes", default="bfloat16,float32")
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--out", default="benchmarks/results/attention_small")
    args = ap.parse_args()
    gen = torch.Generator().manual_seed(0)
    res = {"command": report.command(), "host": report.host(), "cells": [],
           "rule": {"min_problems": _CPU_GEMM_MIN_PROBLEMS, "keys": _CPU_GEMM_KEYS, "max_key_rows": _CPU_GEMM_MAX_KEY_ROWS}}
    table, series = [], {}
    for dtype_name in args.dtypes.split(","):
        dtype = getattr(torch, dtype_name)
        for heads in args.heads.split(","):
            hkv, m = (int(x) for x in heads.split("x"))
            for b in (int(x) for x in args.rows.split(",")):
                for length in (int(x) for x in args.keys.split(",")):
                    layers = []
                    for _ in range(LAYERS):
                        buf = torch.randn(2, b, hkv, length + 1, D, generator=gen).to(dtype)  # a pool row: room after
                        k, v = buf[0, :, :, :length], buf[1, :, :, :length]  # [B, Hkv, L, D] views
                        q = torch.randn(b, hkv, m, D, generator=gen).to(dtype)
                        valid = torch.full((b,), length)
                        valid[0] = max(1, length - 1)
                        layers.append((q, k, v, valid, key_mask(valid, length, dtype)))
                    us = per_layer_us(ARMS, layers, args.reps)
                    chosen = {_cpu_flash_with_lse: "flash", _cpu_gemm_with_lse: "gemm", None: "reference"}[
                        _fast_path(layers[0][0], layers[0][1])]
                    load = os.getloadavg()[0]
                    res["cells"].append({"dtype": dtype_name, "hkv": hkv, "m": m, "b": b, "keys": length, "us": us,
                                         "chosen": chosen, "load": load})
                    table.append({"dtype": dtype_name, "heads": f"{hkv} x {m}", "b": b, "problems": b * hkv,
                                  "keys": length, **{n: f"{t:.0f}" for n, t in us.items()},
                                  "ratio": f"{us['flash'] / us['gemm']:.2f}", "chosen": chosen, "load": f"{load:.2f}"})
                    series.setdefault(f"{dtype_name} {hkv}x{m}, L={length}", []).append((b, us["flash"] / us["gemm"]))
                    print(table[-1], flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    note = (f"us per layer (median of {args.reps} passes over {LAYERS} layers' buffers, the arms taking turns); "
            f"flash / gemm > 1: the GEMMs faster. chosen: what `_fast_path` picks for the shape (gemm in bfloat16 from "
            f"{_CPU_GEMM_MIN_PROBLEMS} problems B x Hkv, {_CPU_GEMM_KEYS[0]} to {_CPU_GEMM_KEYS[1]} keys, and in any dtype "
            f"for one query row up to 128 keys; for both, from a bfloat16 cache, at most {_CPU_GEMM_MAX_KEY_ROWS} keys in "
            "all, B x Hkv x L).")
    report.write(out, res, "Many small attention problems: flash kernel vs float32 GEMMs", note,
                 [("dtype", "dtype", "{}"), ("Hkv x M", "heads", "{}"), ("B", "b", "{}"), ("B x Hkv", "problems", "{}"),
                  ("L", "keys", "{}"), ("flash us", "flash", "{}"), ("gemm us", "gemm", "{}"),
                  ("reference us", "reference", "{}"), ("flash / gemm", "ratio", "{}"), ("chosen", "chosen", "{}"),
                  ("load avg", "load", "{}")], table)
    report.plot(out.with_suffix(".png"), [(label, [p[0] for p in pts], [p[1] for p in pts], "o-")
                                          for label, pts in series.items()],
                "B (rows)", "flash / gemm (> 1: GEMMs faster)", "Many small attention problems")


if __name__ == "__main__":
    main()
