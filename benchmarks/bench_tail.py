"""One sample after its prompt vs in the pool: the decode step of an n=1 request on the embedded model
with its K/V kept after its prompt in the prompt's segment (one attention pass a layer) against the
pool row (the pool pass, the prompt's pass and their merge), A/B in one process.

    python benchmarks/bench_tail.py --lens 256,2048 --reps 4 --out benchmarks/results/tail_n1_ab
    python benchmarks/bench_tail.py --lens 256,2048 --reps 4 --cached --out benchmarks/results/tail_n1_cached_ab

One `LLM()` with default settings; the two arms alternate, request by request, on fresh prompts that
each request prefills, or with `--cached` on one prompt per length that the prefix cache already holds
(then the K/V of the cached prompt are copied into a segment with room after them, inside the timed
`generate` call; what a repeated prompt costs and gains). Per request: the median of `--steps` engine decode steps, timed one by one; per
cell, those medians over `--reps` requests, and `LLM.generate` end to end as (t(33 tokens) - t(1)) / 32.
Writes OUT.json, OUT.md and OUT.png.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import report

from forklm import LLM, SamplingParams

ARMS = {"after the prompt": True, "pool row": False}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lens", default="256,2048", help="prompt lengths")
    ap.add_argument("--reps", type=int, default=4, help="requests per arm and length")
    ap.add_argument("--steps", type=int, default=32, help="decode steps timed per request")
    ap.add_argument("--cached", action="store_true", help="every request repeats a prompt the prefix cache holds")
    ap.add_argument("--out", default="benchmarks/results/tail_n1_ab")
    args = ap.parse_args()
    out = Path(args.out)
    llm = LLM()
    counter = [0]

    def fresh(length: int) -> list[int]:
        counter[0] += 1
        salt = 0 if args.cached else counter[0]
        return [(17 * i + 7 * salt) % 40000 + 100 for i in range(length)]

    def params(tokens: int) -> SamplingParams:
        return SamplingParams(n=1, max_tokens=tokens, temperature=0.8, seed=0, ignore_eos=True)

    def step_median(engine, length: int) -> float:
        """ms: the median decode step of one fresh request (its prefill and first decode step untimed)."""
        rid = f"r{counter[0]}"
        engine.add_request(rid, fresh(length), params(args.steps + 8))
        engine.step()
        engine.step()
        times = []
        for _ in range(args.steps):
            t = time.perf_counter()
            engine.step()
            times.append(time.perf_counter() - t)
        while engine.has_unfinished():
            engine.step()
        engine.pop_output(rid)
        return 1e3 * statistics.median(times)

    def generate_s(length: int, tokens: int) -> float:
        t = time.perf_counter()
        llm.generate(prompt_token_ids=[fresh(length)], sampling_params=params(tokens), use_tqdm=False)
        return time.perf_counter() - t

    res = {"command": report.command(), "host": report.host(), "precision": llm.precision_summary(), "cells": []}
    rows = []
    for length in map(int, args.lens.split(",")):
        generate_s(length, args.steps + 8)  # sizes the engine for this length
        engine = llm._engine
        step = {arm: [] for arm in ARMS}
        e2e = {arm: [] for arm in ARMS}
        for _ in range(args.reps):
            for arm, tails in ARMS.items():
                engine.scheduler.tails = tails
                step[arm].append(step_median(engine, length))
                e2e[arm].append(1e3 * (generate_s(length, 33) - generate_s(length, 1)) / 32)
        engine.scheduler.tails = True
        load = os.getloadavg()[0]
        for arm in ARMS:
            cell = {"prompt_len": length, "arm": arm, "step_ms": step[arm], "generate_ms": e2e[arm], "load_1min": load}
            res["cells"].append(cell)
            rows.append({**cell, "step": " / ".join(f"{x:.1f}" for x in step[arm]),
                         "best": min(step[arm]), "e2e": " / ".join(f"{x:.1f}" for x in e2e[arm])})
            print(f"L={length:5d} {arm:16s} step ms {rows[-1]['step']:28s} generate ms/step {rows[-1]['e2e']}"
                  f"  load {load:.2f}")
    prompts = "one cached prompt per length" if args.cached else "fresh prompts"
    report.write(out, res, "One sample's K/V after its prompt vs in the pool, n=1",
                 f"{res['precision']}. Arms alternate request by request in one process, {prompts}. step: "
                 "the median of the timed engine steps of each request; generate: (t(33 tokens) - t(1)) / 32 of "
                 "`LLM.generate`, each request.",
                 [("L", "prompt_len", "{}"), ("arm", "arm", "{}"), ("step ms (each request)", "step", "{}"),
                  ("best step ms", "best", "{:.1f}"), ("generate ms/step (each)", "e2e", "{}"),
                  ("load 1 min", "load_1min", "{:.2f}")], rows)
    lens = sorted({c["prompt_len"] for c in res["cells"]})
    report.plot(out.with_suffix(".png"),
                [(arm, lens, [min(c["step_ms"]) for c in res["cells"] if c["arm"] == arm], style)
                 for arm, style in zip(ARMS, ("o-", "s--"))],
                "prompt tokens", "best decode step, ms", "n=1 on the embedded model")


if __name__ == "__main__":
    main()
