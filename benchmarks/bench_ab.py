"""A/B of two forklm versions in one process: this tree ("after") against an earlier commit ("before"),
`LLM.generate` calls alternating, so that a busy moment of a shared host falls on both arms alike.

    python benchmarks/bench_ab.py --before 0e67ad2 --cells 1x256,4x256,16x256,64x256,64x2048 --rounds 6 \
        --out benchmarks/results/ab_example

The earlier commit's `src/forklm` is read with `git archive` into a temporary folder as the package
`forklm_before` (its absolute imports and its custom operators' namespace renamed to match), and both
are imported side by side. Each cell (n samples x prompt of L tokens) first warms both arms up, then
runs `--rounds` rounds; each round times, for each arm (the order flipping between rounds), a 1-token
and a (T+1)-token `generate` of the default LLM (the embedded model, default settings):
ms/step = (t(T+1) - t(1)) / T. Reported per cell: each arm's minimum and median, and the median of the
per-round ratios before / after (> 1: the tree is faster), with their range.

Writes OUT.json (every round's figures), OUT.md (the table) and OUT.png (median ms/step of each arm
per cell, the per-round ranges as error bars).
"""

from __future__ import annotations

import argparse
import importlib
import io
import os
import re
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import report

ROOT = Path(__file__).resolve().parent.parent
OLD = "forklm_before"


def import_before(rev: str, into: Path):
    """The forklm package of commit `rev`, imported as `forklm_before` from a copy under `into`."""
    data = subprocess.run(["git", "-C", str(ROOT), "archive", rev, "src/forklm"], check=True,
                          capture_output=True).stdout
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        tar.extractall(into, filter="data")
    pkg = into / OLD
    (into / "src" / "forklm").rename(pkg)
    for f in pkg.rglob("*.py"):  # absolute imports and the custom ops' library name: the copy's own
        text = f.read_text()
        text = re.sub(r"\b(from|import) forklm\b", rf"\1 {OLD}", text)
        text = text.replace("forklm::", f"{OLD}::").replace('"forklm.', f'"{OLD}.')
        f.write_text(text)
    sys.path.insert(0, str(into))
    return importlib.import_module(OLD)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--before", required=True, help="the commit to compare this tree with")
    ap.add_argument("--cells", default="1x256,4x256,16x256,64x256,64x2048", help="n x L, comma-separated")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--gen-tokens", type=int, default=32, help="T: timed decode steps per call")
    ap.add_argument("--llm-kwargs", default="{}", help="LLM(...) keywords (JSON) for both arms")
    ap.add_argument("--out", default="benchmarks/results/ab")
    args = ap.parse_args()

    import json

    import forklm

    kwargs = json.loads(args.llm_kwargs)
    before_rev = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", args.before], check=True,
                                capture_output=True, text=True).stdout.strip()
    after_rev = subprocess.run(["git", "-C", str(ROOT), "describe", "--always", "--dirty"], check=True,
                               capture_output=True, text=True).stdout.strip()
    with tempfile.TemporaryDirectory() as tmp:
        old = import_before(args.before, Path(tmp))
        arms = {"before": (old.LLM(**kwargs), old.SamplingParams), "after": (forklm.LLM(**kwargs), forklm.SamplingParams)}
        cells, rows = {}, []
        for cell in args.cells.split(","):
            n, length = map(int, cell.split("x"))
            prompt = [(17 * i + 5) % 40000 + 100 for i in range(length)]

            def run(arm: str, tokens: int) -> float:
                llm, params = arms[arm]
                p = params(n=n, max_tokens=tokens, temperature=0.8, seed=0, ignore_eos=True)
                t = time.perf_counter()
                llm.generate(prompt_token_ids=[prompt], sampling_params=p, use_tqdm=False)
                return time.perf_counter() - t

            for arm in arms:
                run(arm, 9)  # warm-up: first-call work, the kernels' measurement
            ms = {arm: [] for arm in arms}
            loads = []
            for r in range(args.rounds):
                for arm in list(arms)[:: 1 if r % 2 == 0 else -1]:
                    t1 = run(arm, 1)
                    ms[arm].append((run(arm, args.gen_tokens + 1) - t1) / args.gen_tokens * 1e3)
                loads.append(os.getloadavg()[0])
            ratios = [b / a for b, a in zip(ms["before"], ms["after"])]
            cells[cell] = {"n": n, "L": length, "ms": ms, "ratios": ratios, "load1": loads}
            row = {"cell": f"{n} x {length}", "load": f"{min(loads):.1f}-{max(loads):.1f}",
                   "ratio": statistics.median(ratios), "range": f"{min(ratios):.2f}-{max(ratios):.2f}"}
            for arm in arms:
                row[f"{arm}_min"], row[f"{arm}_med"] = min(ms[arm]), statistics.median(ms[arm])
            rows.append(row)
            print(f"n={n} L={length}: before {row['before_min']:.1f} / {row['before_med']:.1f}, after "
                  f"{row['after_min']:.1f} / {row['after_med']:.1f} ms/step (min / median); before/after "
                  f"{row['ratio']:.3f} ({row['range']}), load {row['load']}", flush=True)

    out = Path(args.out)
    res = {"host": report.host(), "command": report.command(), "before": before_rev, "after": after_rev,
           "llm_kwargs": kwargs, "gen_tokens": args.gen_tokens, "rounds": args.rounds, "cells": cells}
    note = (f"before = `{before_rev}`, after = `{after_rev}`, one process, `LLM({args.llm_kwargs})` each, calls "
            f"alternating; ms/step = (t({args.gen_tokens + 1} tokens) - t(1 token)) / {args.gen_tokens} of "
            f"`generate(n, temperature=0.8)` on the embedded model; {args.rounds} rounds per cell. before/after: "
            "median of the per-round ratios (> 1: after is faster) and their range. load = 1-minute load average.")
    columns = [("n x L", "cell", "{}"), ("before min / median ms", "before_min", "{:.1f}"), ("", "before_med", "{:.1f}"),
               ("after min / median ms", "after_min", "{:.1f}"), ("", "after_med", "{:.1f}"),
               ("before / after", "ratio", "{:.3f}"), ("range", "range", "{}"), ("load", "load", "{}")]
    report.write(out, res, "A/B of two forklm versions, one process", note, columns, rows)
    plot(out.with_suffix(".png"), cells, before_rev, after_rev)
    print(f"wrote {out}.json, .md and .png")


def plot(path: Path, cells: dict, before: str, after: str) -> None:
    """Per cell: the median ratio before / after, the per-round range as an error bar, 1 marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(cells)
    med = [statistics.median(cells[c]["ratios"]) for c in names]
    err = [[m - min(cells[c]["ratios"]) for m, c in zip(med, names)],
           [max(cells[c]["ratios"]) - m for m, c in zip(med, names)]]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.bar(range(len(names)), med, 0.6, yerr=err, capsize=4, color="tab:blue")
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set(xticks=range(len(names)), xticklabels=[f"n={cells[c]['n']}\nL={cells[c]['L']}" for c in names],
           ylabel="ms/step before / after (> 1: after faster)", title=f"forklm {after} vs {before}, one process")
    ax.set_ylim(min(0.8, min(m - e for m, e in zip(med, err[0])) - 0.02), max(m + e for m, e in zip(med, err[1])) + 0.05)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
