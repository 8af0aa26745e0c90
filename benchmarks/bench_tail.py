"""Samples after their prompt vs in the pool: the decode step of a request of n samples on the embedded
model with its K/V kept after its prompt in the prompt's segment (interleaved when n > 1: one attention
pass a layer, masked per sample) against pool rows (the pool pass, the prompt's pass and their merge),
A/B in one process.

    python benchmarks/bench_tail.py --lens 256,2048 --reps 4 --out benchmarks/results/tail_n1_ab
    python benchmarks/bench_tail.py --ns 2,4,8 --lens 256,2048 --reps 3 --out benchmarks/results/tail_interleaved_ab
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
    ap.add_argument("--ns", default="1", help="samples per request (n * n * (steps + 8) within the scheduler's bound)")
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

    def params(n: int, tokens: int) -> SamplingParams:
        return SamplingParams(n=n, max_tokens=tokens, temperature=0.8, seed=0, ignore_eos=True)

    def step_median(engine, n: int, length: int) -> float:
        """ms: the median decode step of one fresh request (its prefill and first decode step untimed)."""
        rid = f"r{counter[0]}"
        engine.add_request(rid, fresh(length), params(n, args.steps + 8))
        engine.step()
        assert engine.scheduler.running[rid].tail == engine.scheduler.tails, "not kept after the prompt"
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

    def generate_s(n: int, length: int, tokens: int) -> float:
        t = time.perf_counter()
        llm.generate(prompt_token_ids=[fresh(length)], sampling_params=params(n, tokens), use_tqdm=False)
        return time.perf_counter() - t

    res = {"command": report.command(), "host": report.host(), "precision": llm.precision_summary(), "cells": []}
    rows = []
    ns = list(map(int, args.ns.split(",")))
    for length in map(int, args.lens.split(",")):
        generate_s(max(ns), length, args.steps + 8)  # sizes the engine for this length
        engine = llm._engine
        for n in ns:
            step = {arm: [] for arm in ARMS}
            e2e = {arm: [] for arm in ARMS}
            for _ in range(args.reps):
                for arm, tails in ARMS.items():
                    engine.scheduler.tails = tails
                    step[arm].append(step_median(engine, n, length))
                    e2e[arm].append(1e3 * (generate_s(n, length, 33) - generate_s(n, length, 1)) / 32)
            engine.scheduler.tails = True
            load = os.getloadavg()[0]
            for arm in ARMS:
                cell = {"n": n, "prompt_len": length, "arm": arm, "step_ms": step[arm], "generate_ms": e2e[arm],
                        "load_1min": load}
                res["cells"].append(cell)
                rows.append({**cell, "step": " / ".join(f"{x:.1f}" for x in step[arm]),
                             "best": min(step[arm]), "e2e": " / ".join(f"{x:.1f}" for x in e2e[arm])})
                print(f"n={n:3d} L={length:5d} {arm:16s} step ms {rows[-1]['step']:28s} generate ms/step "
                      f"{rows[-1]['e2e']}  load {load:.2f}", flush=True)
    prompts = "one cached prompt per length" if args.cached else "fresh prompts"
    report.write(out, res, "Samples' K/V after their prompt vs in the pool",
                 f"{res['precision']}. Arms alternate request by request in one process, {prompts}. step: "
                 "the median of the timed engine steps of each request; generate: (t(33 tokens) - t(1)) / 32 of "
                 "`LLM.generate`, each request.",
                 [("n", "n", "{}"), ("L", "prompt_len", "{}"), ("arm", "arm", "{}"), ("step ms (each request)", "step", "{}"),
                  ("best step ms", "best", "{:.1f}"), ("generate ms/step (each)", "e2e", "{}"),
                  ("load 1 min", "load_1min", "{:.2f}")], rows)
    lens = sorted({c["prompt_len"] for c in res["cells"]})
    report.plot(out.with_suffix(".png"),
                [(f"{arm}, L={length}", ns, [min(c["step_ms"]) for c in res["cells"]
                                               if c["arm"] == arm and c["prompt_len"] == length], style)
                 for length in lens for arm, style in zip(ARMS, ("o-", "s--"))],
                "samples n", "best decode step, ms", "the embedded model, default settings")


if __name__ == "__main__":
    main()
