"""Shared-prefix workload (SGLang's "generated-shared-prefix" shape, scaled to a small CPU).

G groups of P prompts; every prompt of a group is the group's system prompt (Ls tokens) followed
by its own question (Lq tokens); n samples per prompt, T new tokens each (EOS ignored). All
requests are queued at once and the engine is stepped to the end, as `LLM.generate` does. Modes,
each in a fresh `LLM` of the same model, in one process:

  shared      the defaults: prefix cache on; the system prompt is computed once per group and read
              once per decode step for the group's P * n rows (3 levels: system -> question -> sample)
  no-sharing  enable_prefix_caching=False: each prompt computed and stored alone (its n samples
              still share it: 2 levels)
  replicated  kv_layout="replicated": each sample row holds its own copy of its prompt

Reported per mode: decode ms per step (median of the steps with no prefill in them), the whole
run's wall time and generated tokens/s, TTFT (mean / max over requests), and the peak K/V in use.
With --profile K, the first K decode-only steps of each mode (K tokens more per sample, so the
timed steps are as many as without it; left out of every timing) run under torch.profiler and their self CPU time is split into the parts below: what
sharing can shrink (attention kernels, K/V copies) and what it cannot (linears, sampling, the rest
of the step, the same work on the same rows in every mode).

    python benchmarks/bench_prefix.py                      # 4 x 8 x (1024 + 64), n=4, T=32, embedded model
    python benchmarks/bench_prefix.py --groups 2 --prompts 2 --system 256 --question 16 --out-suffix _small
    python benchmarks/bench_prefix.py --dtype auto --modes shared,no-sharing --profile 4 --out-suffix _profiled
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import time
from pathlib import Path

import report
import torch

from torch.profiler import ProfilerActivity, profile

from forklm import LLM, SamplingParams
from forklm.engine.scheduler import DECODE
from forklm.kv import CacheShape

RESULTS = Path(__file__).resolve().parent / "results"
MODES = {
    "shared": {},
    "no-sharing": {"enable_prefix_caching": False},
    "replicated": {"kv_layout": "replicated"},
}
# --profile: operator name fragments -> part of the decode step (first match wins; anything else is "rest")
PARTS = {
    "linears": ("linear_pointwise", "int4pack_mm", "int8pack_mm", "fp16_linear", "fbgemm", "aten::linear", "aten::addmm", "aten::mm"),
    "attention": ("flash_attention", "scaled_dot_product", "aten::bmm", "aten::matmul", "logsumexp"),
    "copies": ("aten::copy_", "aten::index_copy_", "aten::cat"),
    "sampling": ("rshift", "bitwise", "aten::log_", "aten::exp_", "argmax", "topk", "sort", "softmax"),
}


def profiled_parts(engine, steps: int) -> dict:
    """ms per decode step by part, from `steps` profiled engine steps (self CPU time)."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            engine.step()
    parts = dict.fromkeys((*PARTS, "rest"), 0.0)
    for e in prof.key_averages():
        part = next((p for p, keys in PARTS.items() if any(k in e.key for k in keys)), "rest")
        parts[part] += e.self_cpu_time_total / 1e3 / steps
    return parts


def workload(vocab: int, groups: int, prompts: int, system: int, question: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    ids = lambda k: [rng.randrange(100, vocab) for _ in range(k)]  # noqa: E731 (no special tokens)
    return [sys_ + ids(question) for sys_ in (ids(system) for _ in range(groups)) for _ in range(prompts)]


def run_mode(model, dtype: str, mode: str, prompts: list[list[int]], n: int, T: int, profile_steps: int = 0) -> dict:
    llm = LLM(model, dtype=dtype, **MODES[mode])
    shape = CacheShape(len(prompts), len(prompts) * n, n, max(map(len, prompts)), T + profile_steps)
    engine = llm.engine(shape)
    token_bytes = engine.storage.token_bytes
    load = os.getloadavg()[0]
    t_start = time.perf_counter()
    for i, p in enumerate(prompts):
        # K more tokens than timed: the K profiled steps are not counted
        engine.add_request(str(i), p, SamplingParams(n=n, max_tokens=T + profile_steps, temperature=1.0, seed=i,
                                                     ignore_eos=True))
    decode_steps, peak, parts = [], 0, None
    while engine.has_unfinished():
        sch = engine.scheduler
        decode_only = not sch.waiting and all(r.state == DECODE for r in sch.running.values())
        if decode_only and profile_steps and parts is None:  # the first K decode-only steps, left out of the timings
            wall = time.perf_counter() - t_start
            parts = profiled_parts(engine, profile_steps)
            t_start = time.perf_counter() - wall
            continue
        t0 = time.perf_counter()
        engine.step()
        dt = time.perf_counter() - t0
        if decode_only:
            decode_steps.append(dt)
        st = engine.storage
        peak = max(peak, st.rows_in_use * st.pool.length + st.segment_tokens)
    wall = time.perf_counter() - t_start
    outs = [engine.pop_output(str(i)) for i in range(len(prompts))]
    ttft = [o.metrics["ttft_s"] for o in outs]
    generated = sum(min(len(c.token_ids), T) for o in outs for c in o.outputs)
    del engine, llm
    return {
        "mode": mode,
        "decode_ms": 1e3 * statistics.median(decode_steps),
        "decode_steps": len(decode_steps),
        "wall_s": wall,
        "tokens_per_s": generated / wall,
        "ttft_mean_s": statistics.mean(ttft),
        "ttft_max_s": max(ttft),
        "kv_peak_mib": peak * token_bytes / 2**20,
        "cached_tokens": sum(o.num_cached_tokens for o in outs),
        "load_before": load,
        "load_after": os.getloadavg()[0],
        **({f"profiled_{k}_ms": v for k, v in parts.items()} if parts else {}),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None, help="HF folder or .gguf (default: the embedded SmolLM2)")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--groups", type=int, default=4)
    ap.add_argument("--prompts", type=int, default=8, help="prompts per group")
    ap.add_argument("--system", type=int, default=1024, help="system prompt tokens")
    ap.add_argument("--question", type=int, default=64, help="question tokens")
    ap.add_argument("-n", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--out-suffix", default="")
    ap.add_argument("--profile", type=int, default=0, metavar="K", help="profile K decode steps per mode (see above)")
    args = ap.parse_args()
    torch.manual_seed(0)
    vocab = LLM(args.model, dtype=args.dtype).config.vocab_size
    prompts = workload(vocab, args.groups, args.prompts, args.system, args.question, seed=0)
    rows = []
    for mode in args.modes.split(","):
        rows.append(run_mode(args.model, args.dtype, mode, prompts, args.n, args.max_tokens, args.profile))
        r = rows[-1]
        print(f"{mode:>11}: decode {r['decode_ms']:.1f} ms/step, wall {r['wall_s']:.1f} s, "
              f"TTFT mean {r['ttft_mean_s']:.2f} s, KV peak {r['kv_peak_mib']:.0f} MiB (load {r['load_before']:.2f})")
    base = {r["mode"]: r for r in rows}
    for r in rows:
        ref = base.get("no-sharing", r)
        r["decode_speedup_vs_no_sharing"] = ref["decode_ms"] / r["decode_ms"]
        r["throughput_vs_no_sharing"] = r["tokens_per_s"] / ref["tokens_per_s"]
    name = (f"prefix_G{args.groups}_P{args.prompts}_S{args.system}_Q{args.question}_n{args.n}_{args.dtype}"
            f"{args.out_suffix}")
    res = {"host": report.host(), "command": report.command(), "args": vars(args), "rows": rows}
    note = (f"{args.groups} groups x {args.prompts} prompts, system prompt {args.system} + question {args.question} "
            f"tokens, n={args.n}, {args.max_tokens} new tokens, {args.dtype}. decode ms: median step with no prefill; "
            "throughput: generated tokens / whole run (prefill included); load: 1-min load average before/after.")
    columns = [("mode", "mode", "{}"), ("decode ms/step", "decode_ms", "{:.1f}"),
               ("decode vs no-sharing", "decode_speedup_vs_no_sharing", "{:.2f}x"),
               ("wall s", "wall_s", "{:.1f}"), ("tokens/s", "tokens_per_s", "{:.1f}"),
               ("throughput vs no-sharing", "throughput_vs_no_sharing", "{:.2f}x"),
               ("TTFT mean s", "ttft_mean_s", "{:.2f}"), ("TTFT max s", "ttft_max_s", "{:.2f}"),
               ("KV peak MiB", "kv_peak_mib", "{:.0f}"), ("cached prompt tokens", "cached_tokens", "{}"),
               ("load before/after", "load_before", "{:.2f}")]
    if args.profile:
        columns += [(f"profiled {p} ms", f"profiled_{p}_ms", "{:.1f}") for p in (*PARTS, "rest")]
    report.write(RESULTS / name, res, "Shared-prefix workload", note, columns, rows)
    _plot(RESULTS / f"{name}.png", rows)
    print((RESULTS / f"{name}.md").read_text())


def _plot(path: Path, rows: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(10, 3.2))
    for ax, key, label in zip(axes, ("decode_ms", "ttft_mean_s", "kv_peak_mib"),
                              ("decode ms / step", "TTFT mean (s)", "K/V peak (MiB)")):
        ax.bar([r["mode"] for r in rows], [r[key] for r in rows], color=["C0", "C1", "C2"][: len(rows)])
        ax.set_title(label, fontsize=9)
        ax.tick_params(labelsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
