"""CPU linears: `F.linear` vs oneDNN on prepacked weights (`forklm.cpu_linear`), on the decode step's
weight shapes of the 110M Llama-shape model (q, k, v, o, gate, up, down x 12 layers + the LM head),
per row count M, in float32 and bfloat16. Times are one pass over distinct weights shaped and counted
as the model's (they stream from memory as in a real step); best of `--reps` passes.
In float32 it also times fbgemm's GEMM on float16 weights (`forklm::fp16_linear`, what low-precision
weights run at few rows; `linear_choice.py` makes the same measurement per host). `--shapes smollm2`
takes the embedded SmolLM2-135M's shapes instead (30 layers, hidden 576, MLP 1536, 3 KV heads of 64,
vocabulary 49152). `--quantized` adds PyTorch's own weight-only kernels on the same shapes (issue 11): int8 with
per-channel scales (`aten._weight_int8pack_mm`) and int4 with groups of 32, scale and zero
(`aten._weight_int4pack_mm_for_cpu`, the layout GGUF Q4_0 / Q4_1 blocks map onto exactly).

    python benchmarks/bench_cpu_linear.py --out benchmarks/results/cpu_linear
    python benchmarks/bench_cpu_linear.py --quantized --dtypes float32 --ms 1,8,64 --out benchmarks/results/cpu_linear_quantized
    python benchmarks/bench_cpu_linear.py --shapes smollm2 --dtypes float32 --ms 1,2,4,8,16,32,64,256 --out benchmarks/results/cpu_linear_fp16_smollm2

Writes OUT.json, OUT.md (the table) and OUT.png (ms per pass vs M, one line per kernel and dtype).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import report
import torch
import torch.nn.functional as F

from forklm.cpu_linear import PACK_ROWS_HINT, fp16_linear_op, fp16_weights_available, pack_fp16, packed_linear_op, \
    packing_available

# (out, in, count) of the decode linears
SHAPES_BY_MODEL = {
    # hidden 768, 12 layers, 12 heads, intermediate 2048, vocab 32000
    "llama110m": [(768, 768, 4 * 12), (2048, 768, 2 * 12), (768, 2048, 12), (32000, 768, 1)],
    # SmolLM2-135M: hidden 576, 30 layers, q/o 576x576, k/v 192x576, MLP 1536, tied head 49152
    "smollm2": [(576, 576, 2 * 30), (192, 576, 2 * 30), (1536, 576, 2 * 30), (576, 1536, 30), (49152, 576, 1)],
}


def best_pass_s(fn, reps: int) -> float:
    fn()
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


@torch.inference_mode()
def measure(M: int, dtype: torch.dtype, reps: int, quantized: bool = False,
            spec: list[tuple[int, int, int]] = SHAPES_BY_MODEL["llama110m"]) -> dict:
    shapes = [(o, i) for o, i, c in spec for _ in range(c)]
    flops = sum(2 * M * o * i for o, i in shapes)
    xs = {i: torch.randn(M, i, dtype=dtype) for _, i, _ in spec}
    dense = [torch.randn(o, i, dtype=dtype) * 0.02 for o, i in shapes]
    row = {"M": M, "dtype": str(dtype).removeprefix("torch."), "gflop": flops / 1e9}
    row["f_linear_ms"] = 1e3 * best_pass_s(lambda: [F.linear(xs[w.shape[1]], w) for w in dense], reps)
    op = packed_linear_op()
    packed = [torch.ops.mkldnn._reorder_linear_weight(w, PACK_ROWS_HINT) for w in dense]
    del dense
    row["packed_ms"] = 1e3 * best_pass_s(lambda: [op(xs[w.shape[1]], w, None) for w in packed], reps)
    del packed
    if dtype == torch.float32 and fp16_weights_available():
        op16 = fp16_linear_op()
        half = [(o, i, pack_fp16(torch.randn(o, i) * 0.02)) for o, i in shapes]
        row["fp16_ms"] = 1e3 * best_pass_s(lambda: [op16(xs[i], w, None, o) for o, i, w in half], reps)
        row["fp16_speedup"] = row["packed_ms"] / row["fp16_ms"]
        del half
    if quantized:
        row.update(measure_quantized(shapes, xs, reps))
    row["speedup"] = row["f_linear_ms"] / row["packed_ms"]
    row["f_linear_gflops"] = flops / row["f_linear_ms"] / 1e6
    row["packed_gflops"] = flops / row["packed_ms"] / 1e6
    return row


def measure_quantized(shapes: list[tuple[int, int]], xs: dict, reps: int) -> dict:
    """int8 (per-channel) and int4 (groups of 32) weight-only kernels over the same weights' shapes."""
    group = 32
    int8 = [(torch.randint(-127, 128, (o, i), dtype=torch.int8), torch.rand(o, dtype=xs[i].dtype) * 0.01)
            for o, i in shapes]
    t8 = best_pass_s(lambda: [torch.ops.aten._weight_int8pack_mm(xs[w.shape[1]], w, s) for w, s in int8], reps)
    del int8
    int4 = []
    for o, i in shapes:
        q = torch.randint(0, 16, (o, i), dtype=torch.int32)
        scales_zeros = torch.rand(i // group, o, 2, dtype=xs[i].dtype) * 0.01  # [K/G, N, (scale, zero)]
        int4.append((i, torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1), scales_zeros))
    t4 = best_pass_s(lambda: [torch.ops.aten._weight_int4pack_mm_for_cpu(xs[i], w, group, sz) for i, w, sz in int4],
                     max(1, reps // 2))
    return {"int8_ms": 1e3 * t8, "int4_ms": 1e3 * t4}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ms", default="1,8,64,256,2048", help="row counts")
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--out", default="benchmarks/results/cpu_linear")
    ap.add_argument("--quantized", action="store_true", help="also int8 / int4 weight-only kernels (float32 only)")
    ap.add_argument("--shapes", choices=sorted(SHAPES_BY_MODEL), default="llama110m")
    args = ap.parse_args()
    spec = SHAPES_BY_MODEL[args.shapes]
    if not packing_available():
        sys.exit("this torch build has no oneDNN weight packing")
    rows = []
    for dt in args.dtypes.split(","):
        for M in map(int, args.ms.split(",")):
            r = measure(M, getattr(torch, dt), args.reps if M < 1024 else max(2, args.reps // 2), args.quantized, spec)
            rows.append(r)
            quant = f"  int8 {r['int8_ms']:8.1f} ms  int4 {r['int4_ms']:8.1f} ms" if args.quantized else ""
            quant += f"  fp16 {r['fp16_ms']:8.1f} ms (x{r['fp16_speedup']:.2f} vs packed)" if "fp16_ms" in r else ""
            print(f"{r['dtype']:9s} M={M:5d}  F.linear {r['f_linear_ms']:8.1f} ms ({r['f_linear_gflops']:4.0f} GFLOP/s)"
                  f"  packed {r['packed_ms']:8.1f} ms ({r['packed_gflops']:4.0f})  x{r['speedup']:.2f}{quant}", flush=True)
    res = {"command": report.command(), "rows": rows, "host": report.host(), "load_avg": list(os.getloadavg()),
           "shapes": args.shapes}
    fp16 = all("fp16_ms" in r for r in rows)
    params = sum(o * i * c for o, i, c in spec) / 1e6
    out = Path(args.out)
    report.write(out, res, "CPU linears: F.linear vs oneDNN prepacked" + (" vs fbgemm float16 weights" if fp16 else ""),
                 f"One pass over the {args.shapes} shape's decode linears ({sum(c for *_, c in spec)} weights, "
                 f"{params:.1f}M parameters), best of the passes; load average after the run {os.getloadavg()[0]:.2f}.",
                 [("dtype", "dtype", "{}"), ("M", "M", "{}"), ("F.linear ms", "f_linear_ms", "{:.1f}"),
                  ("packed ms", "packed_ms", "{:.1f}"), ("speedup", "speedup", "{:.2f}x"),
                  ("F.linear GFLOP/s", "f_linear_gflops", "{:.0f}"), ("packed GFLOP/s", "packed_gflops", "{:.0f}")]
                 + ([("int8 w-only ms", "int8_ms", "{:.1f}"), ("int4 w-only ms", "int4_ms", "{:.1f}")] if args.quantized else [])
                 + ([("fp16 weights ms", "fp16_ms", "{:.1f}"), ("fp16 vs packed", "fp16_speedup", "{:.2f}x")] if fp16 else []),
                 rows)
    series = [(f"{label} {dt}", [r["M"] for r in rows if r["dtype"] == dt], [r[key] for r in rows if r["dtype"] == dt], style)
              for dt in args.dtypes.split(",")
              for label, key, style in (("F.linear", "f_linear_ms", "o--"), ("oneDNN packed", "packed_ms", "o-"))
              + ((("int8 weight-only", "int8_ms", "s:"), ("int4 weight-only", "int4_ms", "^:")) if args.quantized else ())
              + ((("fbgemm float16 weights", "fp16_ms", "d-"),) if fp16 and dt == "float32" else ())]
    report.plot(out.with_suffix(".png"), series, "rows M", "ms per pass over the decode linears",
                f"CPU linears, {args.shapes} shapes")
    print(f"wrote {out}.json, .md, .png")


if __name__ == "__main__":
    main()
