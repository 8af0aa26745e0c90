"""Decode attention alone, one layer: forklm's bifurcated attention (context part + sample part, LSE
merge) vs plain SDPA over a replicated cache, and the context part alone, per n and dtype. Eager,
12 layers' worth of distinct caches so that K/V come from memory as in a real step; MHA 12 heads,
head dim 64, prompt `--len`, sample caches of `--t` tokens with 10 decoded.

    python benchmarks/bench_attention.py --out benchmarks/results/attention_cpu

Writes OUT.json, OUT.md (the table) and OUT.png (ms per layer vs n, one line per kernel and dtype).
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import report
import torch

from forklm.attention import attention_with_lse, bifurcated_decode_attention, replicated_decode_attention

H, D, LAYERS = 12, 64, 12


def per_layer_ms(fn_per_layer, reps: int) -> float:
    """Median over `reps` passes of the 12 layers, divided by 12."""
    for i in range(LAYERS):
        fn_per_layer(i)
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        for i in range(LAYERS):
            fn_per_layer(i)
        times.append((time.perf_counter() - t) / LAYERS)
    return 1e3 * statistics.median(times)


@torch.inference_mode()
def measure(n: int, L: int, T: int, dtype: torch.dtype, reps: int) -> dict:
    g = torch.Generator().manual_seed(n)
    rnd = lambda *shape: torch.randn(*shape, generator=g).to(dtype)  # noqa: E731
    q = rnd(n, H, D)  # [S, H, D]
    ctx = [(rnd(1, H, L, D), rnd(1, H, L, D)) for _ in range(LAYERS)]  # [P=1, Hkv, Lc, D]
    smp = [(rnd(n, H, T, D), rnd(n, H, T, D)) for _ in range(LAYERS)]  # [S, Hkv, T, D]
    rep = [(rnd(n, H, L + T, D), rnd(n, H, L + T, D)) for _ in range(LAYERS)]  # [S, Hkv, Lc+T, D]
    ctx_len, dec_len = torch.tensor([L]), torch.full((n,), 10)
    prompt_rows, row_pos = torch.arange(n)[None], torch.arange(n)  # [1, n], [n]
    qc = q.permute(1, 0, 2).reshape(1, H, n, D)  # [1, Hkv, n, D]: the context part's query rows
    scale = D**-0.5
    return {
        "n": n, "L": L, "T": T, "dtype": str(dtype).removeprefix("torch."),
        "bifurcated_ms": per_layer_ms(lambda i: bifurcated_decode_attention(
            q, *ctx[i], ctx_len, prompt_rows, row_pos, *smp[i], dec_len, scale), reps),
        "context_part_ms": per_layer_ms(lambda i: attention_with_lse(qc, *ctx[i], ctx_len, scale), reps),
        "replicated_ms": per_layer_ms(lambda i: replicated_decode_attention(q, *rep[i], dec_len + L, scale), reps),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ns", default="1,2,4,16,64")
    ap.add_argument("--len", type=int, default=2048)
    ap.add_argument("--t", type=int, default=32)
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--out", default="benchmarks/results/attention_cpu")
    args = ap.parse_args()
    rows = []
    for dt in args.dtypes.split(","):
        for n in map(int, args.ns.split(",")):
            r = measure(n, args.len, args.t, getattr(torch, dt), args.reps)
            r["speedup"] = r["replicated_ms"] / r["bifurcated_ms"]
            rows.append(r)
            print(f"{r['dtype']:9s} n={n:4d}  bifurcated {r['bifurcated_ms']:7.3f}  context part {r['context_part_ms']:7.3f}"
                  f"  replicated {r['replicated_ms']:7.3f} ms/layer  x{r['speedup']:.2f}", flush=True)
    res = {"command": report.command(), "rows": rows, "host": report.host()}
    out = Path(args.out)
    report.write(out, res, "Decode attention, one layer",
                 f"MHA {H} heads, head dim {D}, prompt {args.len}, sample caches of {args.t} tokens (10 decoded); "
                 "eager; median ms per layer over passes of 12 layers' distinct caches.",
                 [("dtype", "dtype", "{}"), ("n", "n", "{}"), ("bifurcated ms", "bifurcated_ms", "{:.3f}"),
                  ("context part ms", "context_part_ms", "{:.3f}"), ("replicated ms", "replicated_ms", "{:.3f}"),
                  ("replicated / bifurcated", "speedup", "{:.2f}x")], rows)
    series = [(f"{key[:-3]} {dt}", [r["n"] for r in rows if r["dtype"] == dt], [r[key] for r in rows if r["dtype"] == dt], style)
              for dt in args.dtypes.split(",")
              for key, style in (("bifurcated_ms", "o-"), ("replicated_ms", "s--"), ("context_part_ms", "^:"))]
    report.plot(out.with_suffix(".png"), series, "n (samples of one prompt)", "ms per layer",
                f"Decode attention, prompt {args.len}")
    print(f"wrote {out}.json, .md, .png")


if __name__ == "__main__":
    main()
