"""forklm's weight-only CPU linears against torchao's on the same weights, bfloat16 activations: SmolLM2's
four fused layer linears (qkv 960x576, attention output 576x576, gate+up 3072x576, down 576x1536) and its
LM head (49152x576), at 1 / 4 / 16 / 64 rows. Weights are random values on a Q4_1 grid (16 levels from a
group's minimum to its maximum in each group of 32 inputs), what the embedded GGUF holds, so that int4 can
hold them exactly.

    pip install --no-deps torchao==0.18.0
    python benchmarks/bench_torchao.py --out benchmarks/results/torchao_avx512bf16

Arms (each a real module called as `module(x)`; one arm that fails to build or run is reported, not fatal):
- forklm int4 / int8 / dense: `cpu_linear.LowPrecisionLinear` with that one kernel (what the engine runs);
- torchao int4: `PrototypeInt4WeightOnlyConfig(group_size=32)` (torchao's CPU int4 weight-only tensor);
- torchao int8: `Int8WeightOnlyConfig()` (one scale per output row);
- torchao da8w4: `Int8DynamicActivationInt4WeightConfig()` (int8 activations, int4 weights; its CPU kernel
  is a torchao C++ op, `da8w4_linear_cpu`);
- F.linear: the plain bfloat16 weight.
Per cell the arms take turns, round after round; the table gives the median us per call, and beside each
the largest |y - y_ref| / max |y_ref| against float64 over the float values of the grid. Writes OUT.json,
OUT.md and OUT.png (us per call by rows, the qkv linear and the head).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import torch
from torch import nn

import report
from forklm.cpu_linear import LowPrecisionLinear

SHAPES = {"qkv 960x576": (960, 576), "attn out 576x576": (576, 576), "gate+up 3072x576": (3072, 576),
          "down 576x1536": (576, 1536), "LM head 49152x576": (49152, 576)}
PER_LAYER = ("qkv 960x576", "attn out 576x576", "gate+up 3072x576", "down 576x1536")
LAYERS = 30


def q4_1_weight(out_f: int, in_f: int, gen: torch.Generator) -> torch.Tensor:
    """float32 [out, in] on a Q4_1 grid: in each group of 32 inputs, low + q * step with q in 0..15, the
    group's minimum at q = 0 and maximum at q = 15 (as gguf's quantizer places them), step and low bfloat16."""
    groups = in_f // 32
    q = torch.randint(0, 16, (out_f, groups, 32), generator=gen).float()
    q[..., 0], q[..., 1] = 0, 15
    step = (torch.rand(out_f, groups, 1, generator=gen) * 0.01 + 0.001).bfloat16().float()
    low = (-8 * step + torch.randn(out_f, groups, 1, generator=gen) * 0.002).bfloat16().float()
    return (low + q * step).reshape(out_f, in_f)


def arms(weight: torch.Tensor) -> dict:
    """name -> a callable module, or the error that building it raised."""
    out_f, in_f = weight.shape

    def linear() -> nn.Linear:
        m = nn.Linear(in_f, out_f, bias=False, dtype=torch.bfloat16)
        m.weight.data.copy_(weight)
        return m

    def torchao(config) -> nn.Module:
        from torchao.quantization import quantize_

        m = linear()
        quantize_(m, config())
        return m

    def prototype(name: str):
        from torchao.prototype.quantization.int4 import inference_workflow

        return getattr(inference_workflow, name)

    def tao_int8():
        from torchao.quantization import Int8WeightOnlyConfig

        return Int8WeightOnlyConfig()

    def tao_int4():
        return prototype("PrototypeInt4WeightOnlyConfig")(group_size=32)

    def tao_da8w4():
        return prototype("Int8DynamicActivationInt4WeightConfig")()

    builders = {
        "forklm int4": lambda: LowPrecisionLinear(linear(), ((1 << 30, "int4"),)),
        "torchao int4": lambda: torchao(tao_int4),
        "torchao da8w4": lambda: torchao(tao_da8w4),
        "forklm int8": lambda: LowPrecisionLinear(linear(), ((1 << 30, "int8"),)),
        "torchao int8": lambda: torchao(tao_int8),
        "forklm dense": lambda: LowPrecisionLinear(linear(), ((1 << 30, "dense"),)),
        "F.linear": linear,
    }
    built = {}
    for name, build in builders.items():
        try:
            built[name] = build()
        except Exception as exc:  # noqa: BLE001 - an arm this torch / torchao cannot build is a result
            built[name] = exc
    return built


def time_cell(mods: dict, x: torch.Tensor, reps: int, calls: int) -> tuple[dict, dict]:
    """(median us per call, or the error's text), the arms taking turns round by round."""
    ok, failed = {}, {}
    for name, m in mods.items():
        if isinstance(m, Exception):
            failed[name] = f"{type(m).__name__}: {m}"
            continue
        try:
            for _ in range(3):
                m(x)
            ok[name] = m
        except Exception as exc:  # noqa: BLE001
            failed[name] = f"{type(exc).__name__}: {exc}"
    times = {name: [] for name in ok}
    for _ in range(reps):
        for name, m in ok.items():
            t = time.perf_counter()
            for _ in range(calls):
                m(x)
            times[name].append((time.perf_counter() - t) / calls)
    return {name: 1e6 * statistics.median(ts) for name, ts in times.items()}, failed


def rel_error(m: nn.Module, x: torch.Tensor, weight: torch.Tensor) -> float:
    ref = x.double() @ weight.double().T  # [rows, out]
    return float((m(x).double() - ref).abs().max() / ref.abs().max())


@torch.inference_mode()
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", default="1,4,16,64")
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--out", default="benchmarks/results/torchao")
    args = ap.parse_args()
    gen = torch.Generator().manual_seed(0)
    try:
        import torchao

        tao_version = torchao.__version__
    except ImportError:
        tao_version = None
    res = {"command": report.command(), "host": report.host(), "torchao": tao_version, "cells": [], "failed": {}}
    for shape_name, (out_f, in_f) in SHAPES.items():
        weight = q4_1_weight(out_f, in_f, gen)
        mods = arms(weight)
        for rows in [int(r) for r in args.rows.split(",")]:
            x = torch.randn(rows, in_f, generator=gen).bfloat16()
            calls = max(3, int(2e4 / (out_f * in_f / 1e4 * max(1, rows / 4))))  # ~similar time per round
            us, failed = time_cell(mods, x, args.reps, calls)
            err = {name: rel_error(mods[name], x, weight) for name in us}
            res["cells"].append({"linear": shape_name, "rows": rows, "us": us, "rel_error": err,
                                 "load": os.getloadavg()[0]})
            for name, why in failed.items():
                res["failed"].setdefault(name, why)
            print(shape_name, rows, {k: f"{v:.1f}" for k, v in us.items()}, f"load {os.getloadavg()[0]:.2f}", flush=True)
    names = list(dict.fromkeys(n for c in res["cells"] for n in c["us"]))
    table = []
    for c in res["cells"]:
        row = {"linear": c["linear"], "rows": c["rows"], "load": f"{c['load']:.2f}"}
        for n in names:
            row[n] = f"{c['us'][n]:.1f} ({c['rel_error'][n]:.1e})" if n in c["us"] else "-"
        table.append(row)
    for rows in sorted({c["rows"] for c in res["cells"]}):  # a pass over the 120 layer linears
        cells = [c for c in res["cells"] if c["rows"] == rows and c["linear"] in PER_LAYER]
        row = {"linear": f"{LAYERS} layers' 120 linears (ms)", "rows": rows, "load": ""}
        for n in names:
            if all(n in c["us"] for c in cells):
                row[n] = f"{LAYERS * sum(c['us'][n] for c in cells) / 1e3:.2f}"
            else:
                row[n] = "-"
        table.append(row)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    note = (f"torchao {tao_version}, torch {torch.__version__}. us per call, median of {args.reps} rounds (the arms "
            "taking turns); in brackets max |y - y_ref| / max |y_ref| against float64 on the grid's float values. "
            "Arms that failed: " + ("; ".join(f"{k}: {v}" for k, v in res["failed"].items()) or "none") + ".")
    report.write(out, res, "forklm's weight-only CPU linears vs torchao's (bfloat16 activations)", note,
                 [("linear", "linear", "{}"), ("rows", "rows", "{}")] + [(n, n, "{}") for n in names]
                 + [("load avg", "load", "{}")], table)
    series = []
    for shape_name in ("qkv 960x576", "LM head 49152x576"):
        for n in names:
            pts = [(c["rows"], c["us"][n]) for c in res["cells"] if c["linear"] == shape_name and n in c["us"]]
            if pts:
                series.append((f"{shape_name}: {n}", [p[0] for p in pts], [p[1] for p in pts], "o-"))
    report.plot(out.with_suffix(".png"), series, "rows", "us per call", "Weight-only linears: forklm vs torchao")
    print(note)


if __name__ == "__main__":
    main()
