"""One OpenVINO GenAI cell of the peer benchmark: `LLMPipeline(model_dir, "CPU")` generates T new tokens for
each of n sequences sampled from one prompt of token ids, and one JSON line is printed.

    /tmp/ov-venv/bin/python benchmarks/openvino_peer.py --model-dir /tmp/smollm2-ov-int8 \
        --prompt-ids 1,2,3 --n 4 --gen-tokens 32 --threads 2

Runs in OpenVINO's own virtualenv (see benchmarks/README.md): it imports only openvino(-genai), numpy and the
standard library. `bench_peers.py --engines openvino` runs it once per cell.

- The pipeline is the continuous-batching one that LLMPipeline picks on x86 CPUs (paged attention), with an explicit
  SchedulerConfig that keeps its latency defaults (no limit on tokens per step) but turns prefix caching off: the
  default caches the prompt's KV blocks, so every generate after the first would skip the prefill.
- Sampling: `GenerationConfig(do_sample=True, temperature, num_return_sequences=n, ignore_eos=True,
  min_new_tokens=max_new_tokens=T, rng_seed)`; no num_beams needed. The prompt is prefilled once (the first
  step's batch size is 1) and that step samples each sequence's first token from the one prompt row.
- One warm-up generate (3 new tokens; the first call of a shape is slow), then --reps timed ones; the best is kept.
- TTFT = `perf_metrics.get_ttft()` (generate start to the first tokens); ms/step = median gap between steps'
  token times (`raw_metrics.m_new_token_times`, one entry per step) after the first decode step, as forklm's
  cell. `get_tpot()` is per generated token over all sequences, and counts the first step as one token, so it
  is not a step time.
- peak_rss_gb: this process's peak resident memory (model, KV cache, buffers) after the timed runs.
- precision: the CPU plugin's resolved properties for this model and these properties (INFERENCE_PRECISION_HINT:
  bf16 by default on the AVX-512 + avx512_bf16 host; KV cache precision, which the export's rt_info may set), read
  from a second compile of openvino_model.xml after the measurement; weights_mb: the model's constants by element
  type (f32 / u8 / u4 ...).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import openvino as ov
import openvino_genai as ov_genai

PROPS = ("INFERENCE_PRECISION_HINT", "KV_CACHE_PRECISION", "KEY_CACHE_PRECISION", "VALUE_CACHE_PRECISION",
         "DYNAMIC_QUANTIZATION_GROUP_SIZE", "INFERENCE_NUM_THREADS", "NUM_STREAMS")


def prompt_ids(arg: str) -> list[int]:
    """A JSON file of ids ([...] or {"ids": [...]}) or a comma list."""
    if os.path.isfile(arg):
        data = json.loads(Path(arg).read_text())
        return [int(x) for x in (data["ids"] if isinstance(data, dict) else data)]
    return [int(x) for x in arg.split(",") if x.strip()]


def peak_rss_kib() -> int:
    """VmHWM: this process's peak RSS since exec (getrusage's ru_maxrss keeps the parent's across fork + exec)."""
    return next(int(ln.split()[1]) for ln in open("/proc/self/status") if ln.startswith("VmHWM:"))


def run_once(pipe, ids: np.ndarray, cfg, n: int, T: int) -> dict:
    cpu0, t0 = os.times(), time.perf_counter()
    res = pipe.generate(ov.Tensor(ids), cfg)
    wall, cpu1 = time.perf_counter() - t0, os.times()
    assert len(res.tokens) == n and all(len(t) == T for t in res.tokens), [len(t) for t in res.tokens]
    pm = res.perf_metrics
    times = list(pm.raw_metrics.m_new_token_times)  # ms, one per step
    assert len(times) == T, (len(times), T)
    gaps = [b - a for a, b in zip(times, times[1:])]
    gaps = gaps[1:] or gaps  # after the first decode step (warm-up), as forklm's cell
    nan = float("nan")
    return {"prefill_s": pm.get_ttft().mean / 1e3, "step_ms": statistics.median(gaps) if gaps else nan,
            "step_mean_ms": statistics.mean(gaps) if gaps else nan, "step_min_ms": min(gaps, default=nan),
            "generate_s": pm.get_generate_duration().mean / 1e3, "wall_s": wall,
            "cores_used": (cpu1.user + cpu1.system - cpu0.user - cpu0.system) / wall,
            "tpot_ms": pm.get_tpot().mean, "distinct_sequences": len({tuple(t) for t in res.tokens})}


def plugin_facts(model_dir: Path, props: dict) -> dict:
    core = ov.Core()
    model = core.read_model(model_dir / "openvino_model.xml")
    weights: dict[str, float] = {}
    for op in model.get_ordered_ops():
        if op.get_type_name() == "Constant":
            t = op.get_element_type()
            weights[t.get_type_name()] = weights.get(t.get_type_name(), 0.0) + t.bitwidth * int(np.prod(op.shape)) / 8e6
    compiled = core.compile_model(model, "CPU", props)
    name = lambda v: v.get_type_name() if isinstance(v, ov.Type) else str(v)  # noqa: E731
    return {"properties": {k: name(compiled.get_property(k)) for k in PROPS},
            "weights_mb": {k: round(v, 1) for k, v in sorted(weights.items(), key=lambda kv: -kv[1]) if v >= 0.1}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model-dir", required=True, type=Path, help="an optimum-cli export openvino folder")
    ap.add_argument("--prompt-ids", required=True, help="a JSON file of token ids, or a comma list")
    ap.add_argument("--n", type=int, default=1, help="sequences sampled from the prompt (num_return_sequences)")
    ap.add_argument("--gen-tokens", type=int, default=32, help="T: new tokens per sequence")
    ap.add_argument("--threads", type=int, default=2, help="the CPU plugin's INFERENCE_NUM_THREADS")
    ap.add_argument("--reps", type=int, default=2, help="timed generates after one warm-up; the fastest step is kept")
    ap.add_argument("--temperature", type=float, default=0.8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--props", type=json.loads, default={},
                    help='more CPU plugin properties, JSON, e.g. \'{"INFERENCE_PRECISION_HINT": "f32"}\'')
    args = ap.parse_args()
    ids = np.array([prompt_ids(args.prompt_ids)], dtype=np.int64)
    n, T = args.n, args.gen_tokens
    props = {"INFERENCE_NUM_THREADS": args.threads, **args.props}

    sched = ov_genai.SchedulerConfig()
    sched.enable_prefix_caching = False
    sched.max_num_batched_tokens = 2**64 - 1  # LLMPipeline's own default: the whole prompt in one step
    t0 = time.perf_counter()
    pipe = ov_genai.LLMPipeline(str(args.model_dir), "CPU", scheduler_config=sched, **props)
    load_s = time.perf_counter() - t0

    def config(tokens: int):
        return ov_genai.GenerationConfig(max_new_tokens=tokens, min_new_tokens=tokens, ignore_eos=True, do_sample=True,
                                         temperature=args.temperature, num_return_sequences=n, rng_seed=args.seed)

    run_once(pipe, ids, config(min(T, 3)), n, min(T, 3))  # warm-up
    runs = [run_once(pipe, ids, config(T), n, T) for _ in range(args.reps)]
    peak_rss_gb = peak_rss_kib() / 2**20
    best = min(runs, key=lambda r: r["step_ms"])
    out = {**best, "prefill_s": min(r["prefill_s"] for r in runs), "reps_step_ms": [r["step_ms"] for r in runs],
           "reps_prefill_s": [r["prefill_s"] for r in runs], "tok_s": 1e3 * n / best["step_ms"],
           "gen_tok_s": n * T / best["generate_s"], "peak_rss_gb": peak_rss_gb, "load_s": load_s,
           "L": int(ids.shape[1]), "n": n, "T": T, "threads": args.threads, "props": props,
           "model_dir": str(args.model_dir), "openvino": ov.get_version(), "openvino_genai": ov_genai.get_version(),
           **plugin_facts(args.model_dir, props)}
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    sys.exit(main())
