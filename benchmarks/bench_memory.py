"""Peak resident memory of what a user runs, beside the call's speed: one fresh process per run loads a model
with `LLM(**config)` (the embedded SmolLM2 GGUF unless the config names one) and makes one `generate` call of n
samples on an L-token prompt with T new tokens; it reports VmHWM (the peak resident memory) and VmRSS after the
load and after the call. The same process then times `generate` end to end: ms per decode step = (t(T+1 new
tokens) - t(1)) / T, the best of --reps pairs, each call on a fresh random prompt (the prefix cache makes a
repeated prompt free). --arms label=SRC (a checkout or its src/) runs every cell with forklm from other source trees (SRC on PYTHONPATH:
an A/B of commits, the arms alternating run by run). With --llama-batched-bench and --llama-gguf, llama.cpp's
`llama-batched-bench` runs the same cell (one prompt shared by n sequences, -kvu, as in bench_peers.py) and its
peak resident memory is its process's ru_maxrss.

    python benchmarks/bench_memory.py --arms before=/tmp/ab/before/src after=src --runs 2 \
        --llama-batched-bench /tmp/llamacpp/build/bin/llama-batched-bench --llama-gguf /tmp/smollm2-f32.gguf \
        --out benchmarks/results/memory_n64_L2048

Writes OUT.json, OUT.md and OUT.png (peak resident MiB per run, one bar per arm and run).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import report

CHILD = r"""
import json, os, sys, time
def mem():
    d = {}
    for line in open("/proc/self/status"):
        if line.startswith(("VmHWM", "VmRSS")):
            key, value = line.split(":")
            d[key] = int(value.split()[0]) / 1024  # MiB
    return d
import torch
from forklm import LLM, SamplingParams
cfg = json.loads(sys.argv[1])
n, L, T, reps = (int(a) for a in sys.argv[2:6])
t0 = time.perf_counter()
llm = LLM(**cfg)
out = {"load_s": time.perf_counter() - t0, "after_load": mem()}
g = torch.Generator().manual_seed(0)
def call(tokens):
    prompt = torch.randint(100, 40000, (L,), generator=g).tolist()
    p = SamplingParams(n=n, max_tokens=tokens, temperature=0.8, seed=1, ignore_eos=True)
    t = time.perf_counter()
    llm.generate(prompt_token_ids=[prompt], sampling_params=p, use_tqdm=False)
    return time.perf_counter() - t
out["call_s"] = call(T)
out["after_call"] = mem()
steps = [(call(T + 1) - call(1)) / T for _ in range(reps)]
out["step_ms"], out["reps_step_ms"] = 1e3 * min(steps), [1e3 * s for s in steps]
out["dtype"], out["precision"] = str(llm.dtype), llm.precision_summary()
out["load_avg"], out["forklm"] = os.getloadavg()[0], os.path.dirname(os.path.dirname(__import__("forklm").__file__))
print(json.dumps(out))
"""

# runs a command and prints the peak resident memory of it and its children (ru_maxrss, KiB on Linux)
MAXRSS = r"""
import json, resource, subprocess, sys
p = subprocess.run(sys.argv[1:], capture_output=True, text=True)
lines = (p.stdout + p.stderr).splitlines()
print(json.dumps({"rc": p.returncode, "maxrss_mib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
                  "rows": [json.loads(ln) for ln in lines if ln.startswith("{")], "tail": "\n".join(lines[-8:])}))
"""


def forklm_run(src: str, cfg: dict, n: int, L: int, T: int, reps: int) -> dict:
    """One process with forklm imported from `src` (a checkout's root or its src/ folder)."""
    if (Path(src) / "src" / "forklm").is_dir():
        src = str(Path(src) / "src")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [src, os.environ.get("PYTHONPATH")]))}
    p = subprocess.run([sys.executable, "-c", CHILD, json.dumps(cfg), str(n), str(L), str(T), str(reps)],
                       capture_output=True, text=True, env=env, timeout=1800)
    if p.returncode:
        raise RuntimeError(f"forklm run failed (rc {p.returncode}): {p.stderr[-600:]}")
    res = json.loads(p.stdout.strip().splitlines()[-1])
    if Path(res["forklm"]).resolve() != Path(src).resolve():
        raise RuntimeError(f"the run imported forklm from {res['forklm']}, not {src}")
    commit = subprocess.run(["git", "-C", src, "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    dirty = subprocess.run(["git", "-C", src, "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                           text=True)
    res["commit"] = commit.stdout.strip() + ("+changes" if dirty.stdout.strip() else "")
    return res


def llama_run(binary: str, gguf: str, n: int, L: int, T: int, threads: int) -> dict:
    ctx = -(-(L + n * T) // 256) * 256  # -kvu: one buffer, the prompt once plus every sequence's tokens
    cmd = [binary, "-m", gguf, "-c", str(ctx), "-b", "2048", "-ub", "512", "-npp", str(L), "-ntg", str(T),
           "-npl", str(n), "-pps", "-kvu", "-t", str(threads), "--output-format", "jsonl"]
    p = subprocess.run([sys.executable, "-c", MAXRSS, *cmd], capture_output=True, text=True, timeout=1800)
    res = json.loads(p.stdout.strip().splitlines()[-1])
    if res["rc"]:
        raise RuntimeError(f"llama-batched-bench failed: {res['tail']}")
    if not res["rows"]:
        raise RuntimeError(f"llama-batched-bench printed no result: {res['tail']}")
    row = res["rows"][-1]
    return {"peak_mib": res["maxrss_mib"], "step_ms": 1e3 * row["t_tg"] / T, "prefill_s": row["t_pp"],
            "command": subprocess.list2cmdline(cmd), "load_avg": os.getloadavg()[0]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=64)
    ap.add_argument("--len", type=int, default=2048, help="L: prompt tokens")
    ap.add_argument("--gen-tokens", type=int, default=32, help="T: new tokens per sample")
    ap.add_argument("--reps", type=int, default=2, help="timed (T+1, 1) call pairs per process; the best is kept")
    ap.add_argument("--runs", type=int, default=2, help="fresh processes per arm (and for llama.cpp)")
    ap.add_argument("--arms", nargs="+", default=["this=src"], help="label=SRC: forklm source trees to run")
    ap.add_argument("--config", type=json.loads, default={}, help="JSON passed to LLM(...)")
    ap.add_argument("--threads", type=int, default=2, help="llama.cpp -t (forklm uses torch's default)")
    ap.add_argument("--llama-batched-bench", default=os.environ.get("FORKLM_LLAMA_BATCHED_BENCH"))
    ap.add_argument("--llama-gguf", help="the GGUF llama.cpp runs (e.g. the embedded model converted to F32)")
    ap.add_argument("--out", default="benchmarks/results/memory")
    args = ap.parse_args()
    arms = [a.split("=", 1) for a in args.arms]
    rows = []
    for run in range(args.runs):
        for label, src in arms:  # alternating, so that a busy moment of the host hits every arm
            r = forklm_run(str(Path(src).resolve()), args.config, args.n, args.len, args.gen_tokens, args.reps)
            rows.append({"engine": f"forklm {label} ({r['commit']})", "run": run + 1,
                         "load_peak": r["after_load"]["VmHWM"], "load_rss": r["after_load"]["VmRSS"],
                         "peak": r["after_call"]["VmHWM"], "call_rss": r["after_call"]["VmRSS"],
                         "step_ms": r["step_ms"], "load_s": r["load_s"], "load_avg": r["load_avg"], "raw": r})
            print(rows[-1]["engine"], {k: round(v, 1) for k, v in rows[-1].items() if isinstance(v, float)}, flush=True)
        if args.llama_batched_bench and args.llama_gguf:
            r = llama_run(args.llama_batched_bench, args.llama_gguf, args.n, args.len, args.gen_tokens, args.threads)
            rows.append({"engine": f"llama.cpp ({Path(args.llama_gguf).name})", "run": run + 1, "load_peak": float("nan"),
                         "load_rss": float("nan"), "peak": r["peak_mib"], "call_rss": float("nan"),
                         "step_ms": r["step_ms"], "load_s": float("nan"), "load_avg": r["load_avg"], "raw": r})
            print(rows[-1]["engine"], round(r["peak_mib"], 1), round(r["step_ms"], 1), flush=True)
    out = Path(args.out)
    res = {"host": report.host(), "command": report.command(), "n": args.n, "L": args.len, "T": args.gen_tokens,
           "config": args.config, "rows": rows}
    note = (f"One fresh process per row: load, then one generate call of n={args.n} samples on an L={args.len}-token "
            f"prompt, T={args.gen_tokens} new tokens. Memory in MiB: VmHWM (peak resident) and VmRSS after the load "
            "and after the call (llama.cpp: its process's peak, ru_maxrss). ms/step: generate end to end, "
            "(t(T+1) - t(1)) / T, best of the process's pairs (llama.cpp: its t_tg / T). load s: `LLM()`'s time. load avg: the 1-minute "
            "load when the row ended (2 cores; ~1-2 is this benchmark alone).")
    report.write(out, res, f"Peak memory, n={args.n}, L={args.len}", note,
                 [("engine", "engine", "{}"), ("run", "run", "{}"), ("peak after load", "load_peak", "{:.0f}"),
                  ("resident after load", "load_rss", "{:.0f}"), ("peak after the call", "peak", "{:.0f}"),
                  ("resident after the call", "call_rss", "{:.0f}"), ("ms/step", "step_ms", "{:.1f}"),
                  ("load s", "load_s", "{:.1f}"), ("load avg", "load_avg", "{:.2f}")], rows)
    plot(out.with_suffix(".png"), rows, f"Peak resident memory, n={args.n}, L={args.len}")


def plot(path: Path, rows: list[dict], title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 0.5 * len(rows) + 1.5))
    labels = [f"{r['engine']} #{r['run']}" for r in rows]
    ax.barh(labels, [r["peak"] for r in rows])
    ax.set(xlabel="peak resident memory (MiB)", title=title)
    ax.invert_yaxis()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
