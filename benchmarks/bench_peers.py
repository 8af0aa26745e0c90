"""Peer benchmark: forklm vs llama.cpp's `llama-batched-bench` on the same GGUF file (forklm's embedded
SmolLM2-135M-Instruct Q4_1) and OpenVINO GenAI on an export of the same weights, one prompt of L tokens shared by
n sequences, T new tokens each: prefill time, ms per decode step (one step = one token for each of the n sequences)
and decode tokens/s, per cell.

    python benchmarks/bench_peers.py --llama-batched-bench /tmp/llamacpp/build/bin/llama-batched-bench \
        --openvino-python /tmp/ov-venv/bin/python --openvino-model /tmp/smollm2-ov-fp32,/tmp/smollm2-ov-int8
    python benchmarks/bench_peers.py --lens 256 --ns 1,4 --out /tmp/peers_small      # a quick check
    python benchmarks/bench_peers.py --forklm-configs '{"name": "f32"}' '{"name": "bf16", "dtype": "bfloat16"}'

llama.cpp cells: one `llama-batched-bench -pps` process per cell and mode, `-npl n` repeated --reps times (the
best kept); modes `kvu` (-kvu: one KV buffer, the prompt's cells shared by all sequences, every query attending
over all L + n*t cells with a mask) and `split` (a KV stream per sequence: the prompt's K/V copied into each, a copy
llama.cpp defers to the first decode step, so it lands in T_TG, not T_PP). Its prompt is token id 0 repeated L
times and each step decodes token 0 again (no sampling; the logits are computed).
forklm cells: `llm.make_engine` (a fresh engine and prefix cache per cell) with one request of
`SamplingParams(n, max_tokens=T, temperature=0.8, seed=0, ignore_eos=True)` on an English prompt; the first
`engine.step()` is prefill + first token (TTFT), the first decode step is a warm-up, the median of the others is
the step (whole step: model, sampling, bookkeeping).
OpenVINO cells: one `openvino_peer.py` process per cell in OpenVINO's own virtualenv (--openvino-python; setup in
benchmarks/README.md), `LLMPipeline(model, "CPU")` with `num_return_sequences=n, do_sample=True, temperature=0.8,
ignore_eos=True` on forklm's prompt ids, prefix caching off; TTFT from its perf metrics, the step the median gap
between its steps' token times after the first decode step; a warm-up generate, then --reps (the best kept); its
peak RSS, OpenVINO version and the CPU plugin's resolved precisions are in the JSON.
Writes OUT.json, OUT.md, OUT.png (ms/step vs n, one line per engine/config, one panel per L).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import psutil
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import report
from forklm import LLM, SamplingParams
from forklm.default_model import default_model_path
from forklm.kv import CacheShape

TEXT = ("The quick brown fox jumps over the lazy dog while the farmer counts his sheep in the morning light. "
        "Rivers run to the sea, mountains keep their snow, and the old library opens its doors at nine. ")
FLAGS = ("avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_tile")


def host(threads: int) -> dict:
    flags = next((ln.split(":", 1)[1].split() for ln in open("/proc/cpuinfo") if ln.startswith("flags")), [])
    return {**report.host(), "threads": threads, "logical_cpus": os.cpu_count(),
            "cpu_flags": [f for f in FLAGS if f in flags]}


def _busy() -> tuple[float, float, float]:
    """(CPU s used by the machine, by this process and its waited-for children, wall clock)."""
    t, c, wall = psutil.cpu_times(), psutil.Process().cpu_times(), time.perf_counter()
    return sum(t) - t.idle - getattr(t, "iowait", 0.0), c.user + c.system + c.children_user + c.children_system, wall


def others_cores(mark: tuple[float, float, float]) -> float:
    busy, own, wall = _busy()
    return max(0.0, (busy - mark[0]) - (own - mark[1])) / max(wall - mark[2], 1e-3)


def measured(fn, quiet_wait: float):
    """fn() after waiting (up to quiet_wait s) for a 1 s window where other processes use < 0.25 cores, with the
    1-minute load average before/after and the cores other processes used meanwhile (the host is shared)."""
    t_end = time.perf_counter() + quiet_wait
    while True:
        mark = _busy()
        time.sleep(1.0)
        if (quiet := others_cores(mark)) < 0.25 or time.perf_counter() > t_end:
            break
    if quiet >= 0.25:
        print(f"  (no quiet second in {quiet_wait:.0f} s: other processes use {quiet:.2f} cores; measuring anyway)", flush=True)
    load, mark = os.getloadavg()[0], _busy()
    r = fn()
    return {**r, "quiet_before": quiet, "load1_before": load, "load1_after": os.getloadavg()[0],
            "others_cores": others_cores(mark)}


# ---- llama.cpp ----------------------------------------------------------------------------------
def llama_cell(binary: str, gguf: str, mode: str, L: int, n: int, T: int, threads: int, reps: int,
               extra: list[str], timeout: float) -> dict:
    need = L + n * T if mode == "kvu" else n * (L + T)  # batched-bench skips a cell silently if -c is short
    ctx = -(-need // 256) * 256
    cmd = [binary, "-m", gguf, "-c", str(ctx), "-b", "2048", "-ub", "512", "-npp", str(L), "-ntg", str(T),
           "-npl", ",".join([str(n)] * reps), "-pps", "-t", str(threads), "--output-format", "jsonl",
           *(["-kvu"] if mode == "kvu" else []), *extra]
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"timed out after {timeout:.0f} s: {subprocess.list2cmdline(cmd)}") from None
    rows = [json.loads(ln) for ln in (p.stdout + p.stderr).splitlines() if ln.startswith("{")]
    if p.returncode or len(rows) != reps:
        raise RuntimeError(f"rc {p.returncode}, {len(rows)} rows: {(p.stdout + p.stderr)[-300:]}")
    log = [ln for ln in (p.stdout + p.stderr).splitlines() if ln.startswith(("build:", "llama_kv_cache_unified: size"))]
    return {"prefill_s": min(r["t_pp"] for r in rows), "step_ms": 1e3 * min(r["t_tg"] for r in rows) / T,
            "reps_step_ms": [1e3 * r["t_tg"] / T for r in rows], "reps_prefill_s": [r["t_pp"] for r in rows],
            "command": subprocess.list2cmdline(cmd), "log": log}


# ---- OpenVINO GenAI ------------------------------------------------------------------------------
def openvino_cell(python: str, model: str, prompt: list[int], n: int, T: int, threads: int, reps: int, props: dict,
                  timeout: float) -> dict:
    with tempfile.NamedTemporaryFile("w", suffix=".json") as f:
        json.dump(prompt, f)
        f.flush()
        cmd = [python, str(Path(__file__).with_name("openvino_peer.py")), "--model-dir", model, "--prompt-ids", f.name,
               "--n", str(n), "--gen-tokens", str(T), "--threads", str(threads), "--reps", str(reps),
               "--props", json.dumps(props)]
        try:
            p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            raise RuntimeError(f"timed out after {timeout:.0f} s: {subprocess.list2cmdline(cmd)}") from None
    rows = [json.loads(ln) for ln in p.stdout.splitlines() if ln.startswith("{")]
    if p.returncode or not rows:
        raise RuntimeError(f"rc {p.returncode}: {(p.stdout + p.stderr)[-300:]}")
    return {**rows[-1], "command": subprocess.list2cmdline(cmd)}


# ---- forklm -------------------------------------------------------------------------------------
def forklm_once(llm: LLM, prompt: list[int], n: int, T: int) -> dict:
    engine = llm.make_engine(CacheShape(1, n, n, len(prompt), T))
    engine.add_request("r", prompt, SamplingParams(n=n, max_tokens=T, temperature=0.8, seed=0, ignore_eos=True))
    stamps, tokens, t0 = [], 0, time.perf_counter()
    while engine.has_unfinished():
        got = sum(len(d.token_ids) for d in engine.step())
        if got:
            stamps.append(time.perf_counter())
            tokens += got
    out = engine.pop_output("r")
    assert tokens == n * T and len(out.outputs) == n, (tokens, n, T)
    gaps = [b - a for a, b in zip(stamps, stamps[1:])][1:]  # decode steps after the first (warm-up)
    return {"prefill_s": stamps[0] - t0, "step_ms": 1e3 * statistics.median(gaps), "step_mean_ms": 1e3 * statistics.mean(gaps),
            "step_min_ms": 1e3 * min(gaps)}


def forklm_cell(llm: LLM, prompt: list[int], n: int, T: int, reps: int) -> dict:
    runs = []
    for _ in range(reps):
        gc.collect()
        runs.append(forklm_once(llm, prompt, n, T))
    best = min(runs, key=lambda r: r["step_ms"])
    return {**best, "prefill_s": min(r["prefill_s"] for r in runs), "reps_step_ms": [r["step_ms"] for r in runs],
            "reps_prefill_s": [r["prefill_s"] for r in runs]}


KERNELS = ("int4pack_mm", "int8pack_mm", "fbgemm_linear", "_linear_pointwise", "aten.mm.", "aten.addmm.",
           "aten.linear.", "flash_attention", "efficient_attention")  # a step's heavy operators


class _Capture(TorchDispatchMode):
    """Records the heavy operators (KERNELS) of everything run under it, with their arguments."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if any(k in str(func) for k in KERNELS):
            self.calls.append((func, args, kwargs))
        return func(*args, **kwargs)


def kernel_floor_cell(llm: LLM, prompt: list[int], n: int, T: int, reps: int) -> dict:
    """forklm's decode step with everything but its heavy kernels free: the linears' and attention's
    operators of one mid-decode step (step T // 2), recorded with their arguments and replayed back to
    back (one dispatcher call each, no Python glue, no small operators, no sampling). No change to the
    step's glue can make it faster than this with these kernels."""
    engine = llm.make_engine(CacheShape(1, n, n, len(prompt), T))
    engine.add_request("r", prompt, SamplingParams(n=n, max_tokens=T, temperature=0.8, seed=0, ignore_eos=True))
    engine.step()  # prefill + first token
    for _ in range(T // 2 - 1):
        engine.step()
    cap = _Capture()
    with cap:
        engine.step()
    names = [str(f) for f, _, _ in cap.calls]

    def replay() -> float:
        t = time.perf_counter()
        for f, a, k in cap.calls:
            f(*a, **k)
        return time.perf_counter() - t

    replay()
    times = [replay() for _ in range(max(5, 4 * reps))]
    engine.abort("r")
    return {"prefill_s": float("nan"), "step_ms": 1e3 * min(times), "reps_step_ms": [1e3 * min(times), 1e3 * statistics.median(times)],  # min, median
            "kernel_calls": {k: names.count(k) for k in dict.fromkeys(names)}}


def make_prompt(llm: LLM, L: int) -> list[int]:
    return llm.encode(TEXT * (L // 20 + 2))[:L]  # ~40 tokens per TEXT: about 2L tokens


# ---- output -------------------------------------------------------------------------------------
COLUMNS = [("L", "L", "{}"), ("n", "n", "{}"), ("engine", "engine", "{}"), ("prefill / TTFT s", "prefill_s", "{:.3f}"),
           ("ms/step", "step_ms", "{:.1f}"), ("decode tok/s", "tok_s", "{:.1f}"), ("reps ms/step", "reps_txt", "{}"),
           ("peak RSS GB", "rss_txt", "{}"),
           ("load1 before", "load1_before", "{:.2f}"), ("other cores", "others_cores", "{:.2f}")]


def plot(cells: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lens = sorted({c["L"] for c in cells})
    engines = list(dict.fromkeys(c["engine"] for c in cells))
    if not lens:
        return
    fig, axes = plt.subplots(1, len(lens), figsize=(4.8 * len(lens), 4), squeeze=False)
    for ax, L in zip(axes[0], lens):
        for i, e in enumerate(engines):
            pts = sorted((c["n"], c["step_ms"]) for c in cells if c["L"] == L and c["engine"] == e)
            if pts:
                ax.plot(*zip(*pts), marker="o", color=f"C{i}", label=e)
        ax.set(xscale="log", yscale="log", xlabel="n (sequences sharing the prompt)", ylabel="ms / decode step",
               title=f"prompt {L} tokens")
        ns = sorted({c["n"] for c in cells})
        ax.set_xticks(ns, [str(n) for n in ns])
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    csv = lambda f: lambda s: [f(x) for x in s.split(",") if x]  # noqa: E731
    ap.add_argument("--lens", type=csv(int), default=[256, 2048])
    ap.add_argument("--ns", type=csv(int), default=[1, 4, 16, 64])
    ap.add_argument("--gen-tokens", type=int, default=32, help="T: new tokens per sequence")
    ap.add_argument("--threads", type=int, default=2, help="torch threads, llama.cpp -t, OpenVINO threads")
    ap.add_argument("--reps", type=int, default=2, help="runs per cell and engine; the fastest decode is kept")
    ap.add_argument("--engines", type=csv(str), default=["llama.cpp", "forklm", "openvino"])
    ap.add_argument("--llama-batched-bench", default=os.environ.get("FORKLM_LLAMA_BATCHED_BENCH"),
                    help="path of llama-batched-bench (default: $FORKLM_LLAMA_BATCHED_BENCH)")
    ap.add_argument("--llama-modes", type=csv(str), default=["kvu", "split"], help="kvu: -kvu; split: a stream per sequence")
    ap.add_argument("--llama-extra", default="", help="more llama-batched-bench arguments, e.g. '-fa'")
    ap.add_argument("--llama-timeout", type=float, default=300.0, help="s per llama-batched-bench process")
    ap.add_argument("--openvino-python", default=os.environ.get("FORKLM_OPENVINO_PYTHON"),
                    help="python of a virtualenv with openvino-genai (default: $FORKLM_OPENVINO_PYTHON)")
    ap.add_argument("--openvino-model", type=csv(str), default=[], help="optimum-cli export openvino folders, "
                    "comma-separated: one engine each")
    ap.add_argument("--openvino-props", type=json.loads, default={}, help="JSON: more CPU plugin properties, e.g. "
                    '\'{"INFERENCE_PRECISION_HINT": "f32"}\'')
    ap.add_argument("--openvino-timeout", type=float, default=300.0, help="s per openvino_peer.py process")
    ap.add_argument("--forklm-kwargs", type=json.loads, default={}, help="JSON passed to every LLM(...)")
    ap.add_argument("--forklm-configs", type=json.loads, nargs="+", default=[{"name": "default"}],
                    help="JSON objects: a name and LLM(...) keyword arguments (over --forklm-kwargs)")
    ap.add_argument("--kernel-floor", action="store_true", help="beside each forklm config, its step's heavy "
                    "kernels alone (linears, attention: recorded from one decode step and replayed back to back)")
    ap.add_argument("--quiet-wait", type=float, default=20.0, help="before each cell, wait up to this long (s) for "
                    "other processes to leave the CPUs")
    ap.add_argument("--out", default="benchmarks/results/peers_cpu")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    gguf, T, out = str(default_model_path()), args.gen_tokens, Path(args.out)
    res = {"command": report.command(), "date": time.strftime("%Y-%m-%d %H:%M"), "host": host(args.threads),
           "gguf": gguf, "args": vars(args), "load_start": os.getloadavg(), "cells": [], "skipped": []}
    print(f"host: {res['host']}\nload average: {res['load_start']}\nmodel: {gguf}", flush=True)

    llama = "llama.cpp" in args.engines
    if llama and not (args.llama_batched_bench and os.access(args.llama_batched_bench, os.X_OK)):
        reason = (f"llama.cpp cells skipped: no executable llama-batched-bench ({args.llama_batched_bench!r}; "
                  "pass --llama-batched-bench PATH or set FORKLM_LLAMA_BATCHED_BENCH)")
        print(reason, flush=True)
        res["skipped"], llama = [reason], False
    ov_models = args.openvino_model if "openvino" in args.engines else []
    ov_ready = (args.openvino_python and os.access(args.openvino_python, os.X_OK) and ov_models
                and all((Path(m) / "openvino_model.xml").is_file() for m in ov_models))
    if "openvino" in args.engines and not ov_ready:
        reason = (f"OpenVINO cells skipped: needs --openvino-python (a virtualenv's python with openvino-genai; "
                  f"got {args.openvino_python!r}) and --openvino-model (export folders with openvino_model.xml; got "
                  f"{args.openvino_model!r}); setup in benchmarks/README.md")
        print(reason, flush=True)
        res["skipped"].append(reason)
        ov_models = []
    llms = {}
    if "forklm" in args.engines:
        for cfg in args.forklm_configs:
            kw = {**args.forklm_kwargs, **{k: v for k, v in cfg.items() if k != "name"}}
            name = f"forklm {cfg.get('name', json.dumps(kw))}"
            llms[name] = (LLM(**kw), kw)
            llms[name][0].generate("Hello", SamplingParams(max_tokens=4, seed=0), use_tqdm=False)  # warm-up
    res["forklm_configs"] = {k: kw for k, (_, kw) in llms.items()}
    # OpenVINO gets the same prompt ids as forklm (the first config's tokenizer, or the default model's)
    ids_llm = next(iter(llms.values()))[0] if llms else (LLM() if ov_models else None)
    print(" | ".join(c[0] for c in COLUMNS), flush=True)

    def record(cell: dict) -> None:
        cell["tok_s"] = 1e3 * cell["n"] / cell["step_ms"]
        cell["reps_txt"] = " / ".join(f"{x:.1f}" for x in cell["reps_step_ms"])
        cell["rss_txt"] = f"{cell['peak_rss_gb']:.2f}" if "peak_rss_gb" in cell else "-"
        res["cells"].append(cell)
        print(" | ".join(fmt.format(cell[k]) for _, k, fmt in COLUMNS), flush=True)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.with_suffix(".json").write_text(json.dumps(res, indent=1))

    for L in args.lens:
        prompts = {name: make_prompt(llm, L) for name, (llm, _) in llms.items()}
        ov_prompt = make_prompt(ids_llm, L) if ov_models else []
        for n in args.ns:  # engines interleaved per cell, so slow drifts of a shared host hit them alike
            for mode in args.llama_modes if llama else []:
                try:
                    r = measured(lambda: llama_cell(args.llama_batched_bench, gguf, mode, L, n, T, args.threads,
                                                    args.reps, args.llama_extra.split(), args.llama_timeout),
                                 args.quiet_wait)
                    record({"L": L, "n": n, "engine": f"llama.cpp {mode}", **r})
                except RuntimeError as e:
                    res["skipped"].append(f"llama.cpp {mode} L={L} n={n}: {e}")
                    print(res["skipped"][-1], flush=True)
            for name, (llm, _) in llms.items():
                r = measured(lambda: forklm_cell(llm, prompts[name], n, T, args.reps), args.quiet_wait)
                record({"L": L, "n": n, "engine": name, **r})
                if args.kernel_floor:
                    r = measured(lambda: kernel_floor_cell(llm, prompts[name], n, T, args.reps), args.quiet_wait)
                    record({"L": L, "n": n, "engine": f"{name}: kernels only", **r})
            for model in ov_models:
                try:
                    r = measured(lambda: openvino_cell(args.openvino_python, model, ov_prompt, n, T, args.threads,
                                                       args.reps, args.openvino_props, args.openvino_timeout),
                                 args.quiet_wait)
                    record({"L": L, "n": n, "engine": f"openvino {Path(model).name}", **r})
                except RuntimeError as e:
                    res["skipped"].append(f"openvino {model} L={L} n={n}: {e}")
                    print(res["skipped"][-1], flush=True)
    res["load_end"] = os.getloadavg()
    build = next((c["log"][0] for c in res["cells"] if c.get("log")), "")
    ov = {c["engine"]: c for c in res["cells"] if "openvino" in c}
    ov_note = "".join(f" {e}: precision {c['properties']}, weights MB {c['weights_mb']};" for e, c in ov.items())
    if ov:
        ov_note = (f" OpenVINO {next(iter(ov.values()))['openvino']}: prefill = TTFT (perf metrics: prefill + the n "
                   "first tokens sampled), ms/step = median gap between steps after the first decode step; "
                   f"peak RSS = its process's.{ov_note}")
    note = (f"{T} new tokens per sequence, the prompt shared by the n sequences; best of {args.reps} runs per cell "
            "(prefill and step each their minimum; every run's ms/step in 'reps'). "
            f"Model: `{gguf}` (forklm configs: {res.get('forklm_configs')}). "
            "llama.cpp: prefill = T_PP (one prompt decode, no sampling), ms/step = T_TG / T (every step "
            "decodes token 0, logits computed, nothing sampled); its prompt is token 0 repeated L times, forklm's an "
            "English text (attention cost depends only on the lengths). forklm: prefill = TTFT (prefill + first "
            "token sampled), ms/step = median decode step after a warm-up step (model, sampling, bookkeeping). "
            f"Load average (1 min) start {res['load_start']}, end {res['load_end']}; 'other cores' = CPU used by "
            "other processes during the cell (> 0.3: disturbed; each cell first waits up to "
            f"{args.quiet_wait:.0f} s for a quiet second). CPU flags: {', '.join(res['host']['cpu_flags'])}. "
            f"llama.cpp {build}{ov_note}" + "".join(f"\n\n{x}" for x in res["skipped"]))
    report.write(out, res, "Peer benchmark: forklm vs llama.cpp and OpenVINO GenAI", note, COLUMNS, res["cells"])
    plot(res["cells"], out.with_suffix(".png"), f"decode step vs n ({res['host']['cpu']}, {args.threads} threads)")
    print(f"\nwrote {out}.json / .md / .png; load average end {res['load_end']}", flush=True)


if __name__ == "__main__":
    main()
