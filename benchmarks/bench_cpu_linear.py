"""CPU linears: `F.linear` vs oneDNN on prepacked weights (`forklm.cpu_linear`), on the decode step's
weight shapes of the 110M Llama-shape model (q, k, v, o, gate, up, down x 12 layers + the LM head),
per row count M, in float32 and bfloat16. Times are one pass over distinct weights shaped and counted
as the model's (they stream from memory as in a real step); best of `--reps` passes.

    python benchmarks/bench_cpu_linear.py --out benchmarks/results/cpu_linear

Writes OUT.json, OUT.md (the table) and OUT.png (ms per pass vs M, one line per kernel and dtype).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import report
import torch
import torch.nn.functional as F

from forklm.cpu_linear import PACK_ROWS_HINT, packed_linear_op, packing_available

# (out, in, count) of the decode linears: hidden 768, 12 layers, 12 heads, intermediate 2048, vocab 32000
SHAPES = [(768, 768, 4 * 12), (2048, 768, 2 * 12), (768, 2048, 12), (32000, 768, 1)]


def best_pass_s(fn, reps: int) -> float:
    fn()
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


@torch.inference_mode()
def measure(M: int, dtype: torch.dtype, reps: int) -> dict:
    shapes = [(o, i) for o, i, c in SHAPES for _ in range(c)]
    flops = sum(2 * M * o * i for o, i in shapes)
    xs = {i: torch.randn(M, i, dtype=dtype) for _, i, _ in SHAPES}
    dense = [torch.randn(o, i, dtype=dtype) * 0.02 for o, i in shapes]
    row = {"M": M, "dtype": str(dtype).removeprefix("torch."), "gflop": flops / 1e9}
    row["f_linear_ms"] = 1e3 * best_pass_s(lambda: [F.linear(xs[w.shape[1]], w) for w in dense], reps)
    op = packed_linear_op()
    packed = [torch.ops.mkldnn._reorder_linear_weight(w, PACK_ROWS_HINT) for w in dense]
    del dense
    row["packed_ms"] = 1e3 * best_pass_s(lambda: [op(xs[w.shape[1]], w, None) for w in packed], reps)
    row["speedup"] = row["f_linear_ms"] / row["packed_ms"]
    row["f_linear_gflops"] = flops / row["f_linear_ms"] / 1e6
    row["packed_gflops"] = flops / row["packed_ms"] / 1e6
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ms", default="1,8,64,256,2048", help="row counts")
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--out", default="benchmarks/results/cpu_linear")
    args = ap.parse_args()
    if not packing_available():
        sys.exit("this torch build has no oneDNN weight packing")
    rows = []
    for dt in args.dtypes.split(","):
        for M in map(int, args.ms.split(",")):
            r = measure(M, getattr(torch, dt), args.reps if M < 1024 else max(2, args.reps // 2))
            rows.append(r)
            print(f"{r['dtype']:9s} M={M:5d}  F.linear {r['f_linear_ms']:8.1f} ms ({r['f_linear_gflops']:4.0f} GFLOP/s)"
                  f"  packed {r['packed_ms']:8.1f} ms ({r['packed_gflops']:4.0f})  x{r['speedup']:.2f}", flush=True)
    res = {"command": report.command(), "rows": rows, "host": report.host()}
    out = Path(args.out)
    report.write(out, res, "CPU linears: F.linear vs oneDNN prepacked",
                 "One pass over the 110M Llama-shape model's decode linears (85 weights, 109.5M parameters), "
                 "best of the passes.",
                 [("dtype", "dtype", "{}"), ("M", "M", "{}"), ("F.linear ms", "f_linear_ms", "{:.1f}"),
                  ("packed ms", "packed_ms", "{:.1f}"), ("speedup", "speedup", "{:.2f}x"),
                  ("F.linear GFLOP/s", "f_linear_gflops", "{:.0f}"), ("packed GFLOP/s", "packed_gflops", "{:.0f}")], rows)
    series = [(f"{label} {dt}", [r["M"] for r in rows if r["dtype"] == dt], [r[key] for r in rows if r["dtype"] == dt], style)
              for dt in args.dtypes.split(",")
              for label, key, style in (("F.linear", "f_linear_ms", "o--"), ("oneDNN packed", "packed_ms", "o-"))]
    report.plot(out.with_suffix(".png"), series, "rows M", "ms per pass over the decode linears",
                "CPU linears, 110M Llama shape")
    print(f"wrote {out}.json, .md, .png")


if __name__ == "__main__":
    main()
