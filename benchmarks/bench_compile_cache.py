"""Compile cost of `LLM(compile=True)` on the embedded model, cold and warm: each run is a fresh Python
process; the first uses an empty inductor cache folder (TORCHINDUCTOR_CACHE_DIR, a new temporary one)
and an empty forklm cache folder (FORKLM_CACHE_DIR: the host's measured kernels, parsed GGUF headers,
inductor's instruction-set verdict), the next ones reuse both, as a second process on the same machine
does with torch's own caches (FX graph and AOT autograd caches, on by default) and forklm's. Per process: load time, the first generate call of
n samples (prefill + the decode steps that compile), then the compiled decode ms/step.

    python benchmarks/bench_compile_cache.py --ns 1 --warm-runs 2 --out benchmarks/results/compile_cache

--after N first makes one call of N samples, so that the step at n is timed on an engine grown to N rows
(a compiled engine used to decode every row it had). --llm-kwargs '{"compile": false}' gives the eager
reference. Writes OUT.json and OUT.md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import report

CHILD = r"""
import json, os, sys, time
t0 = time.perf_counter()
from forklm import LLM, SamplingParams
llm = LLM(**{"compile": True, **json.loads(sys.argv[2])})
load = time.perf_counter() - t0
n, after = int(sys.argv[1]), int(sys.argv[3])
prompt = [(17 * i + 5) % 40000 + 100 for i in range(256)]
def run(tokens, n=n):
    p = SamplingParams(n=n, max_tokens=tokens, temperature=0.8, seed=0, ignore_eos=True)
    t = time.perf_counter()
    llm.generate(prompt_token_ids=[prompt], sampling_params=p, use_tqdm=False)
    return time.perf_counter() - t
first = run(9)
if after:
    run(9, after)  # a larger call first: the engine grows to its rows, and n's step must not pay for them
step = min((run(33) - run(1)) / 32 for _ in range(2))
print(json.dumps({"load_s": load, "first_call_s": first, "step_ms": 1e3 * step, "load_avg": os.getloadavg()[0]}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ns", default="1")
    ap.add_argument("--warm-runs", type=int, default=2)
    ap.add_argument("--llm-kwargs", default="{}", help="more LLM(...) keywords, JSON (compile=True unless given)")
    ap.add_argument("--after", type=int, default=0, help="a call of this many samples before the step is timed")
    ap.add_argument("--out", default="benchmarks/results/compile_cache")
    args = ap.parse_args()
    rows = []
    for n in map(int, args.ns.split(",")):
        with tempfile.TemporaryDirectory(prefix="forklm-inductor-") as cache, \
                tempfile.TemporaryDirectory(prefix="forklm-cache-") as own:
            env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache, "FORKLM_CACHE_DIR": own}
            for i in range(1 + args.warm_runs):
                t = time.perf_counter()
                r = subprocess.run([sys.executable, "-c", CHILD, str(n), args.llm_kwargs, str(args.after)], env=env,
                                   capture_output=True, text=True, check=True)
                row = {"n": n, "run": "cold" if i == 0 else f"warm {i}", "process_s": time.perf_counter() - t,
                       **json.loads(r.stdout.strip().splitlines()[-1])}
                rows.append(row)
                print(f"n={n} {row['run']:7s} process {row['process_s']:6.1f} s  load {row['load_s']:5.1f} s  "
                      f"first call {row['first_call_s']:6.1f} s  step {row['step_ms']:6.1f} ms  "
                      f"load avg {row['load_avg']:.2f}", flush=True)
    res = {"command": report.command(), "host": report.host(), "rows": rows}
    out = Path(args.out)
    report.write(out, res, "torch.compile cost, cold vs warm inductor cache",
                 "Each row a fresh process; cold = empty TORCHINDUCTOR_CACHE_DIR and FORKLM_CACHE_DIR, warm = the "
                 "same folders again. "
                 "first call = generate(n, 9 tokens): prefill + the decode steps that compile. "
                 + (f"Before the step is timed, one call of n={args.after} samples. " if args.after else "")
                 + f"LLM keywords: {args.llm_kwargs}.",
                 [("n", "n", "{}"), ("run", "run", "{}"), ("process s", "process_s", "{:.1f}"),
                  ("load s", "load_s", "{:.1f}"), ("first call s", "first_call_s", "{:.1f}"),
                  ("decode ms/step", "step_ms", "{:.1f}"), ("load avg", "load_avg", "{:.2f}")], rows)
    print(f"wrote {out}.json, .md")


if __name__ == "__main__":
    main()
