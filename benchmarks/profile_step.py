"""Where a decode step's time goes on the embedded model: `torch.profiler` over `LLM.generate`'s
decode steps at n samples, the top operators by self CPU time, for each LLM configuration given.

    python benchmarks/profile_step.py --n 1 --configs '{"dtype": "float32"}' '{}' --out benchmarks/results/profile_n1

Writes OUT_<label>.txt (the operator table) per configuration and OUT.json (per configuration: ms per
decode step measured without the profiler, the profiled share of the linears, attention, sampling and
the rest, and the load average).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import report
from torch.profiler import ProfilerActivity, profile

from forklm import LLM, SamplingParams

GROUPS = {  # operator name fragments -> the part of the step they belong to
    "linears": ("packed_linear", "fp16_linear", "fbgemm", "linear_pointwise", "aten::linear", "aten::addmm", "aten::mm",
                "int8pack_mm", "int4pack_mm"),
    "attention": ("flash_attention", "scaled_dot_product", "attention"),
    "sampling": ("sort", "topk", "softmax", "log_softmax", "argmax", "multinomial", "cumsum", "bitwise", "remainder"),
}


def label_of(cfg: dict) -> str:
    return "_".join(f"{k}-{v}" for k, v in sorted(cfg.items())) or "default"


def decode_ms(llm: LLM, prompt: list[int], n: int, steps: int) -> float:
    """ms per decode step: a (steps + 1)-token call minus a 1-token call, best of 3."""
    def timed(tokens: int) -> float:
        params = SamplingParams(n=n, max_tokens=tokens, temperature=0.8, seed=0, ignore_eos=True)
        t = time.perf_counter()
        llm.generate(prompt_token_ids=[prompt], sampling_params=params, use_tqdm=False)
        return time.perf_counter() - t
    timed(steps + 1)
    return min(1e3 * (timed(steps + 1) - timed(1)) / steps for _ in range(3))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=1)
    ap.add_argument("--prompt-len", type=int, default=256)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--configs", nargs="+", default=['{"dtype": "float32"}', "{}"], help="LLM(...) keyword JSONs")
    ap.add_argument("--rows", type=int, default=25, help="operators listed")
    ap.add_argument("--out", default="benchmarks/results/profile_n1")
    args = ap.parse_args()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    prompt = [(17 * i + 5) % 40000 + 100 for i in range(args.prompt_len)]
    res = {"command": report.command(), "host": report.host(), "n": args.n, "prompt_len": args.prompt_len,
           "configs": []}
    for raw in args.configs:
        cfg = json.loads(raw)
        llm = LLM(**cfg)
        ms = decode_ms(llm, prompt, args.n, args.steps)
        params = SamplingParams(n=args.n, max_tokens=args.steps + 1, temperature=0.8, seed=0, ignore_eos=True)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            llm.generate(prompt_token_ids=[prompt], sampling_params=params, use_tqdm=False)
        events = prof.key_averages()
        total = sum(e.self_cpu_time_total for e in events)
        parts = {g: 0.0 for g in (*GROUPS, "rest")}
        for e in events:
            group = next((g for g, keys in GROUPS.items() if any(k in e.key for k in keys)), "rest")
            parts[group] += e.self_cpu_time_total
        shares = {g: v / total for g, v in parts.items()}
        label = label_of(cfg)
        table = events.table(sort_by="self_cpu_time_total", row_limit=args.rows)
        header = (f"# {res['host']['cpu']}, {res['host']['threads']} threads; {report.command()}\n"
                  f"# LLM({raw}): {llm.precision_summary()}\n"
                  f"# n={args.n}, prompt {args.prompt_len}, {args.steps} decode steps (+ prefill) profiled; "
                  f"unprofiled decode {ms:.1f} ms/step; load {os.getloadavg()[0]:.2f}\n")
        out.with_name(f"{out.name}_{label}.txt").write_text(header + table)
        row = {"config": cfg, "label": label, "decode_ms": ms, "shares": shares, "load_avg": os.getloadavg()[0],
               "precision": llm.precision_summary()}
        res["configs"].append(row)
        print(f"{label:30s} {ms:7.1f} ms/step  " + "  ".join(f"{g} {s:.0%}" for g, s in shares.items())
              + f"  load {row['load_avg']:.2f}", flush=True)
        del llm
    out.with_suffix(".json").write_text(json.dumps(res, indent=1))
    print(f"wrote {out}.json and {out}_<config>.txt")


if __name__ == "__main__":
    main()
