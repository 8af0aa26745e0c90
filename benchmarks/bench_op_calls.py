"""What one call of a kernel costs by the way it is called: through `torch.ops.aten.<op>` (the packet, which
resolves the overload at each call), through its resolved overload (`.default`), and through torch's own
Python binding (`torch.<op>`), on SmolLM2's n=1 decode shapes (bfloat16): the int4 linear of the attention
output (576 x 576, 1 row) and the CPU flash kernel (3 kv heads, 3 query rows each, 261 keys). An n=1 step
makes 120 int4 calls and 30 flash calls.

    python benchmarks/bench_op_calls.py --out benchmarks/results/op_calls_avx512bf16

Writes OUT.json, OUT.md (the table) and OUT.png (us per call by way of calling).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import torch

import report
from forklm.cpu_linear import INT4_GROUP, pack_int4


def per_call_us(ways: dict, args: tuple, kwargs: dict, calls: int, reps: int) -> dict[str, float]:
    """Per way of calling: the median over `reps` rounds of `calls` calls; the ways take turns round by round."""
    for fn in ways.values():
        for _ in range(calls // 4):
            fn(*args, **kwargs)
    times = {name: [] for name in ways}
    for _ in range(reps):
        for name, fn in ways.items():
            t = time.perf_counter()
            for _ in range(calls):
                fn(*args, **kwargs)
            times[name].append((time.perf_counter() - t) / calls)
    return {name: 1e6 * statistics.median(ts) for name, ts in times.items()}


def ways_of(name: str) -> dict:
    packet = getattr(torch.ops.aten, name)
    return {"torch.ops packet": packet, "torch.ops overload": packet.default, "torch binding": getattr(torch, name)}


@torch.inference_mode()
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--calls", type=int, default=1000)
    ap.add_argument("--reps", type=int, default=9)
    ap.add_argument("--out", default="benchmarks/results/op_calls")
    args = ap.parse_args()
    torch.manual_seed(0)
    # a weight on the 4-bit grid (Q4_1-like: 16 levels per group of 32), so that pack_int4 takes it
    levels = torch.randint(0, 16, (576, 576)).float()
    weight = levels * 0.01 - 0.08
    packed, scales_zeros = pack_int4(weight)[:2]
    x = torch.randn(1, 576, dtype=torch.bfloat16)
    q = torch.randn(1, 3, 3, 64, dtype=torch.bfloat16)
    kv = torch.randn(1, 3, 261, 64, dtype=torch.bfloat16)
    cells = [
        ("int4 linear 576x576, 1 row", ways_of("_weight_int4pack_mm_for_cpu"), (x, packed, INT4_GROUP, scales_zeros), {}),
        ("flash, 3 kv heads x 3 rows, 261 keys", ways_of("_scaled_dot_product_flash_attention_for_cpu"),
         (q, kv, kv), {"scale": 0.125}),
    ]
    res = {"command": report.command(), "host": report.host(), "cells": []}
    rows, series = [], []
    for label, ways, a, kw in cells:
        us = per_call_us(ways, a, kw, args.calls, args.reps)
        load = os.getloadavg()[0]
        res["cells"].append({"op": label, "us_per_call": us, "load": load})
        base = us["torch.ops packet"]
        for way, t in us.items():
            rows.append({"op": label, "way": way, "us": f"{t:.2f}", "saved": f"{base - t:.2f}", "load": f"{load:.2f}"})
        series.append((label, list(range(1, len(us) + 1)), list(us.values()), "o-"))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    report.write(out, res, "One kernel call by way of calling",
                 "us per call (median of the rounds, the ways taking turns); saved: us less than the torch.ops packet.",
                 [("op", "op", "{}"), ("way", "way", "{}"), ("us per call", "us", "{}"), ("saved us", "saved", "{}"),
                  ("load avg", "load", "{}")], rows)
    report.plot(out.with_suffix(".png"), series, "1 packet, 2 overload, 3 torch binding", "us per call",
                "One kernel call by way of calling")
    for r in rows:
        print(r)


if __name__ == "__main__":
    main()
