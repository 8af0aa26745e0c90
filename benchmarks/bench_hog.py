"""A busy neighbour: `LLM.generate` end to end with one core taken by another process, per OpenMP wait
policy (issue 11). Each cell runs in a fresh process (the policy is read when torch's OpenMP runtime
starts): the embedded model, one prompt, n samples, ms per token as (t(33 tokens) - t(1 token)) / 32,
quiet and beside a spinning `python -c "while True: pass"`.

    python benchmarks/bench_hog.py --out benchmarks/results/hog

    python benchmarks/bench_hog.py --ns 1,16 --policies ACTIVE,ACTIVE+adaptive,PASSIVE --out benchmarks/results/hog_threads

    python benchmarks/bench_hog.py --ns 1,16 --policies ACTIVE+adaptive \
        --llama-batched-bench /tmp/llamacpp/build/bin/llama-batched-bench --out benchmarks/results/hog_peers

Writes OUT.json, OUT.md and OUT.png. ACTIVE is libgomp's spinning wait (torch's default when the
variable is unset), PASSIVE sleeps at once, spinN spins N times first (GOMP_SPINCOUNT).
With --llama-batched-bench, each n also gets a "llama.cpp" row: `llama-batched-bench -kvu` on the
same GGUF file (bench_peers.llama_cell: a 64-token prompt, 32 steps, best of 2, 2 threads), ms per
decode step = ms per token of each sequence, quiet and beside the same spinner.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import report

CELL = r"""
import json, sys, time
from forklm import LLM, SamplingParams
n = int(sys.argv[1])
llm = LLM(adaptive_threads=sys.argv[2] == "1")
prompt = ["Write a story about a dragon who learns to read. " * 6]

def per_token_ms():
    a = time.perf_counter()
    llm.generate(prompt, SamplingParams(n=n, max_tokens=1, seed=0), use_tqdm=False)
    one = time.perf_counter() - a
    a = time.perf_counter()
    llm.generate(prompt, SamplingParams(n=n, max_tokens=33, ignore_eos=True, seed=0), use_tqdm=False)
    return ((time.perf_counter() - a) - one) / 32 * 1e3

per_token_ms()  # warm
print(json.dumps({"ms": min(per_token_ms() for _ in range(2))}))
"""


def policy_env(policy: str) -> dict:
    """ACTIVE / PASSIVE (OMP_WAIT_POLICY), or spinN: libgomp spins N times before it sleeps (GOMP_SPINCOUNT);
    a "+adaptive" suffix turns forklm's thread governor on (engine/threads.py; off otherwise)."""
    policy = policy.removesuffix("+adaptive")
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    if policy.startswith("spin"):
        return dict(env, GOMP_SPINCOUNT=policy.removeprefix("spin"), OMP_WAIT_POLICY="ACTIVE")
    return dict(env, OMP_WAIT_POLICY=policy)


def cell(policy: str, n: int, hog: bool, llama: str | None = None) -> float:
    neighbour = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if hog else None
    try:
        if policy == "llama.cpp":
            from bench_peers import llama_cell
            from forklm.default_model import default_model_path

            return llama_cell(llama, str(default_model_path()), "kvu", 64, n, 32, 2, 2, [], 600.0)["step_ms"]
        adaptive = "1" if policy.endswith("+adaptive") else "0"
        out = subprocess.run([sys.executable, "-c", CELL, str(n), adaptive], env=policy_env(policy),
                             capture_output=True, text=True, check=True)
    finally:
        if neighbour is not None:
            neighbour.kill()
            neighbour.wait()
    return json.loads(out.stdout.strip().splitlines()[-1])["ms"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ns", default="1,16")
    ap.add_argument("--policies", default="ACTIVE,PASSIVE")
    ap.add_argument("--out", default="benchmarks/results/hog")
    ap.add_argument("--llama-batched-bench", help="also llama.cpp's llama-batched-bench (its path) per n")
    args = ap.parse_args()
    policies = args.policies.split(",") + (["llama.cpp"] if args.llama_batched_bench else [])
    rows = []
    for n in map(int, args.ns.split(",")):
        for policy in policies:
            load = os.getloadavg()[0]
            quiet = cell(policy, n, hog=False, llama=args.llama_batched_bench)
            busy = cell(policy, n, hog=True, llama=args.llama_batched_bench)
            rows.append({"n": n, "policy": policy, "quiet_ms": quiet, "hog_ms": busy, "ratio": busy / quiet,
                         "load_before": load})
            print(f"n={n:3d} {policy:8s} quiet {quiet:7.1f} ms/token  one core busy {busy:7.1f}  x{busy / quiet:.2f}"
                  f"  (load {load:.2f})", flush=True)
    res = {"command": report.command(), "rows": rows, "host": report.host(), "date": time.strftime("%Y-%m-%d %H:%M")}
    out = Path(args.out)
    report.write(out, res, "A busy neighbour: generate with one of the cores taken",
                 "Embedded SmolLM2-135M, forklm's default settings; ms per token end to end "
                 "((t33 - t1) / 32, best of 2), each cell a fresh process; llama.cpp rows: llama-batched-bench -kvu "
                 "on the same file, ms per decode step.",
                 [("n", "n", "{}"), ("OMP_WAIT_POLICY / engine", "policy", "{}"), ("quiet ms/token", "quiet_ms", "{:.1f}"),
                  ("one core busy ms/token", "hog_ms", "{:.1f}"), ("slowdown", "ratio", "{:.2f}x"),
                  ("load avg before", "load_before", "{:.2f}")], rows)
    series = [(f"{p} {kind}", [r["n"] for r in rows if r["policy"] == p], [r[key] for r in rows if r["policy"] == p], style)
              for p in policies for kind, key, style in (("quiet", "quiet_ms", "o-"), ("hog", "hog_ms", "s--"))]
    report.plot(out.with_suffix(".png"), series, "n", "ms per token", "generate beside a CPU hog")
    print(f"wrote {out}.json, .md, .png")


if __name__ == "__main__":
    main()
