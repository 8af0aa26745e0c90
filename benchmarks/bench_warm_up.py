"""What a compiled server's clients wait for: `Engine.warm_up` (what `forklm serve --compile` runs before
serving) against none, on the embedded model. Each run is a fresh Python process: a compiled engine
(`LLM(compile=True).make_engine`), its warm-up (or none), then a mix of requests a server meets (greedy
and sampled, n from 1 to 16, run long enough for the thread governor to probe one thread fewer); per
process the warm-up's seconds, the mix's seconds, the graphs dynamo built during each, and the
governor's probes. cold = empty TORCHINDUCTOR_CACHE_DIR and FORKLM_CACHE_DIR (new temporary ones per
arm), warm = the same folders again.

    python benchmarks/bench_warm_up.py --out benchmarks/results/warm_up

Writes OUT.json and OUT.md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import report

CHILD = r"""
import json, os, sys, time
import torch
from torch._dynamo.utils import counters
from forklm import LLM, SamplingParams
from forklm.kv import CacheShape
engine = LLM(compile=True).make_engine(CacheShape(4, 16, 16, 512, 64), resident_prompts=1)
graphs = lambda: counters["stats"]["unique_graphs"]
t = time.perf_counter()
if sys.argv[1] == "1":
    engine.warm_up()
warm_s, warm_graphs = time.perf_counter() - t, graphs()
prompt = [(17 * i + 5) % 40000 + 100 for i in range(100)]
t = time.perf_counter()
for i, (n, temperature) in enumerate([(1, 0.0), (4, 0.8), (1, 0.8), (16, 1.0), (2, 0.0), (5, 0.7)]):
    engine.add_request(str(i), prompt[i:], SamplingParams(n=n, max_tokens=20, temperature=temperature, seed=i,
                                                          ignore_eos=True))
    if i % 2:  # two requests at a time: mixed batches
        while engine.has_unfinished():
            engine.step()
while engine.has_unfinished():
    engine.step()
print(json.dumps({"warm_up_s": warm_s, "warm_up_graphs": warm_graphs, "mix_s": time.perf_counter() - t,
                  "mix_graphs": graphs() - warm_graphs, "probes": engine.threads.probes,
                  "threads": torch.get_num_threads(), "load_avg": os.getloadavg()[0]}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--warm-runs", type=int, default=1)
    ap.add_argument("--out", default="benchmarks/results/warm_up")
    args = ap.parse_args()
    rows = []
    for arm, flag in (("warm_up", "1"), ("none", "0")):
        with tempfile.TemporaryDirectory(prefix="forklm-inductor-") as cache, \
                tempfile.TemporaryDirectory(prefix="forklm-cache-") as own:
            env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache, "FORKLM_CACHE_DIR": own}
            for run in ["cold"] + [f"warm {i + 1}" for i in range(args.warm_runs)]:
                done = subprocess.run([sys.executable, "-c", CHILD, flag], env=env, capture_output=True, text=True,
                                      timeout=1800)
                if done.returncode != 0:
                    raise SystemExit(done.stderr[-3000:])
                row = {"arm": arm, "run": run, **json.loads(done.stdout.strip().splitlines()[-1])}
                rows.append(row)
                print(f"{arm:8s} {run:7s} warm-up {row['warm_up_s']:6.1f} s ({row['warm_up_graphs']} graphs)  "
                      f"mix {row['mix_s']:6.1f} s ({row['mix_graphs']} graphs, {row['probes']} probes)  "
                      f"load {row['load_avg']:.2f}", flush=True)
    res = {"command": report.command(), "host": report.host(), "rows": rows}
    report.write(Path(args.out), res, "A compiled engine's warm-up vs none, embedded model",
                 "Each row a fresh process: LLM(compile=True).make_engine, Engine.warm_up (or none), then a mix of "
                 "requests (greedy and sampled, n 1-16, two at a time, 20 tokens each). cold: empty inductor and "
                 "forklm caches; warm: the same folders again. graphs: built by dynamo during each part.",
                 [("arm", "arm", "{}"), ("run", "run", "{}"), ("warm-up s", "warm_up_s", "{:.1f}"),
                  ("graphs in warm-up", "warm_up_graphs", "{}"), ("mix s", "mix_s", "{:.1f}"),
                  ("graphs in mix", "mix_graphs", "{}"), ("probes", "probes", "{}"), ("load avg", "load_avg", "{:.2f}")],
                 rows)


if __name__ == "__main__":
    main()
