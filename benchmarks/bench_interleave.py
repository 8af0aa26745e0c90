"""One layer's decode attention for a request of n samples, two ways, in one process: the samples' own
K/V in pool rows (the prompt's pass over all n * G query rows, the pool's pass, their merge: what
`DecodeAttention` runs) against the samples interleaved after the prompt in its segment (one call of
the CPU flash kernel, masked per sample: it computes every sample's slots for each). The work of the
second grows as n * n * t; the scheduler's bound on n * n * max_tokens (`INTERLEAVE_MAX_WORK`) comes
from this table.

    python benchmarks/bench_interleave.py --out benchmarks/results/tail_attention_avx512bf16

SmolLM2-135M's attention shape (3 kv heads, 3 query heads each, head dim 64), bfloat16, random K/V;
t: own tokens of each sample. Per cell the median of `--reps` calls of each way, alternating; the
largest difference between the two outputs is reported beside the times.
"""

from __future__ import annotations

import argparse
import math
import os
import time
from pathlib import Path

import report
import torch

from forklm.attention.ops import attention, attention_with_lse, interleaved_key_mask, key_mask, merge_with_lse


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ns", default="2,4,8,16")
    ap.add_argument("--lens", default="256,2048", help="prompt lengths")
    ap.add_argument("--own", default="16,64,256,1024", help="t: own tokens of each sample")
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--out", default="benchmarks/results/tail_attention")
    args = ap.parse_args()
    torch.manual_seed(0)
    hkv, g, d, dt = 3, 3, 64, torch.bfloat16
    scale = d**-0.5
    res = {"command": report.command(), "host": report.host(), "cells": []}
    for p in map(int, args.lens.split(",")):
        for n in map(int, args.ns.split(",")):
            for t in map(int, args.own.split(",")):
                q = torch.randn(n, hkv, g, d, dtype=dt)  # [n, Hkv, G, D]
                kp, vp = torch.randn(1, hkv, p, d, dtype=dt), torch.randn(1, hkv, p, d, dtype=dt)  # the prompt
                kt, vt = torch.randn(n, hkv, t, d, dtype=dt), torch.randn(n, hkv, t, d, dtype=dt)  # pool rows
                plen, tlen = torch.tensor([p]), torch.full((n,), t)
                pm, tm = key_mask(plen, p, dt), key_mask(tlen, t, dt)

                def pool() -> torch.Tensor:
                    qs = q.permute(1, 0, 2, 3).reshape(1, hkv, n * g, d)  # [1, Hkv, n*G, D]
                    o1, l1 = attention_with_lse(qs, kp, vp, plen, scale, pm)
                    o1 = o1.reshape(hkv, n, g, d).permute(1, 0, 2, 3)  # [n, Hkv, G, D]
                    l1 = l1.reshape(hkv, n, g).permute(1, 0, 2)  # [n, Hkv, G]
                    o2, l2 = attention_with_lse(q, kt, vt, tlen, scale, tm)
                    return merge_with_lse(o1, l1, o2, l2, may_be_empty=False, need_lse=False)[0]

                # slot p + s * n + j holds sample j's s-th token: [n, Hkv, t, D] -> [1, Hkv, t * n, D]
                ka = torch.cat([kp, kt.permute(1, 2, 0, 3).reshape(1, hkv, t * n, d)], 2)
                va = torch.cat([vp, vt.permute(1, 2, 0, 3).reshape(1, hkv, t * n, d)], 2)
                mask = interleaved_key_mask(p + n * t, p, n, torch.arange(n), g, dt)

                def interleaved() -> torch.Tensor:
                    qs = q.permute(1, 0, 2, 3).reshape(1, hkv, n * g, d)  # [1, Hkv, n*G, D]
                    return attention(qs, ka, va, scale, mask).reshape(hkv, n, g, d).permute(1, 0, 2, 3)

                err = (pool().float() - interleaved().float()).abs().max().item()
                times = {"pool": [], "interleaved": []}
                for _ in range(args.reps):
                    for name, f in (("pool", pool), ("interleaved", interleaved)):
                        t0 = time.perf_counter()
                        f()
                        times[name].append(time.perf_counter() - t0)
                ms = {k: 1e3 * sorted(v)[len(v) // 2] for k, v in times.items()}
                cell = {"prompt_len": p, "n": n, "own": t, "work": n * n * t, "pool_ms": ms["pool"],
                        "interleaved_ms": ms["interleaved"], "ratio": ms["pool"] / ms["interleaved"],
                        "max_abs_diff": err, "load_1min": os.getloadavg()[0]}
                res["cells"].append(cell)
                print(f"L={p:5d} n={n:3d} t={t:5d} pool {ms['pool']:7.3f} ms  interleaved {ms['interleaved']:7.3f} ms"
                      f"  ratio {cell['ratio']:.2f}  diff {err:.1e}  load {cell['load_1min']:.2f}", flush=True)
    cells = res["cells"]
    report.write(Path(args.out), res, "One layer's decode attention: samples in pool rows vs interleaved after the prompt",
                 "bfloat16, 3 kv heads x 3 query heads, head dim 64. ratio: pool / interleaved (> 1: interleaved faster). "
                 "work: n * n * t.",
                 [("L", "prompt_len", "{}"), ("n", "n", "{}"), ("t", "own", "{}"), ("n*n*t", "work", "{}"),
                  ("pool ms", "pool_ms", "{:.3f}"), ("interleaved ms", "interleaved_ms", "{:.3f}"),
                  ("ratio", "ratio", "{:.2f}"), ("max abs diff", "max_abs_diff", "{:.1e}"),
                  ("load 1 min", "load_1min", "{:.2f}")], cells)
    series = []
    for p in sorted({c["prompt_len"] for c in cells}):
        mine = sorted((c["work"], c["ratio"]) for c in cells if c["prompt_len"] == p)
        series.append((f"L={p}", [w for w, _ in mine], [r for _, r in mine], "o"))
    report.plot(Path(args.out).with_suffix(".png"), series, "n * n * t", "pool / interleaved time", "one layer, bf16")
    assert all(math.isfinite(c["max_abs_diff"]) for c in cells)


if __name__ == "__main__":
    main()
