"""Decode benchmark (issue 3): ms per decode step, tokens/s, time to first token and memory vs n and
prompt length for forklm bifurcated (eager, compiled), forklm replicated and Hugging Face
`generate(num_return_sequences=n)`, on the same random-weight Llama-shape model; each cell's ratio to
the floor max(bytes / measured read bandwidth, FLOPs / measured GEMM rate), both measured here.

    python benchmarks/bench_decode.py --dtypes float32 --ns 1,4,16,64,256 --lens 256,2048
    python benchmarks/bench_decode.py --small --lens 64 --ns 1,4 --out /tmp/decode_tiny   # logic check

Writes OUT.json (every figure, host, load average), OUT.md (tables) and OUT.png (ms/step vs n).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import shlex
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
import torch
import torch.nn.functional as F

from forklm import LLM, SamplingParams
from forklm.api import DTYPES, available_memory_bytes
from forklm.config import ModelConfig
from forklm.cpu_linear import PACK_ROWS_HINT, packed_linear_op, packing_available
from forklm.kv import CacheShape
from forklm.kv.storage import bytes_per_token

MODES = ("bifurcated", "bifurcated-compiled", "replicated", "hf")
GB = 1e9


# ---- host and model -----------------------------------------------------------------------------
def code_version() -> dict:
    """Which forklm ran: its path, and the git commit (and uncommitted src changes) of its checkout."""
    import subprocess

    import forklm

    root = Path(forklm.__file__).resolve().parents[2]
    git = lambda *a: subprocess.run(["git", "-C", str(root), *a], capture_output=True, text=True).stdout.strip()  # noqa: E731
    return {"forklm": forklm.__file__, "commit": git("rev-parse", "HEAD") or None,
            "src_changes": git("status", "--porcelain", "--", "src") or None}


def host_info() -> dict:
    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), "?")
    return {
        "cpu": cpu, "platform": platform.platform(), "torch": torch.__version__,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(), "threads": torch.get_num_threads(),
        "logical_cpus": os.cpu_count(), "ram_available_gb": available_memory_bytes(torch.device("cpu")) / GB,
    }


def llama_config(small: bool, kv_heads: int | None, max_len: int):
    from transformers import LlamaConfig

    if small:
        dims = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, vocab_size=512)
    else:
        dims = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=2048, vocab_size=32000)
    return LlamaConfig(**dims, num_key_value_heads=kv_heads or dims["num_attention_heads"],
                       max_position_embeddings=max(8192, max_len))


def make_model(folder: str, cfg) -> dict:
    """A random-weight Llama saved with save_pretrained; forklm and transformers load the same file."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(folder)
    return json.loads((Path(folder) / "config.json").read_text())


class Dims:
    """What the floor and the memory formulas need from config.json."""

    def __init__(self, raw: dict):
        self.fcfg = ModelConfig.from_hf(raw)
        self.E, self.layers, self.H = raw["hidden_size"], raw["num_hidden_layers"], raw["num_attention_heads"]
        self.Hkv, self.I, self.V = raw["num_key_value_heads"], raw["intermediate_size"], raw["vocab_size"]
        self.D = self.E // self.H
        # decode linears as (out, in, count): q, k, v, o, gate, up, down per layer, then the LM head
        E, D = self.E, self.D
        self.linears = [(self.H * D, E, self.layers), (self.Hkv * D, E, 2 * self.layers), (E, self.H * D, self.layers),
                        (self.I, E, 2 * self.layers), (E, self.I, self.layers), (self.V, E, 1)]
        self.matmul_params = sum(o * i * c for o, i, c in self.linears)
        self.norm_params = (2 * self.layers + 1) * E

    def weight_bytes(self, es: int) -> int:  # all weights resident (the embedding table too)
        return (self.matmul_params + self.norm_params + self.V * self.E) * es

    def kv_token_bytes(self, es: int) -> int:  # K and V of one token, all layers
        return 2 * self.layers * self.Hkv * self.D * es


# ---- measured rates -----------------------------------------------------------------------------
def _time_s(fn, reps: int = 5, best: bool = False) -> float:
    """Seconds per call: the median (or, for peak rates, the minimum) of `reps` timed batches of calls,
    each batch long enough (>= 20 ms) that scheduler noise on a shared machine stays small."""
    fn()
    k, t = 1, time.perf_counter()
    fn()
    k = max(1, int(0.02 / max(time.perf_counter() - t, 1e-7)))
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        for _ in range(k):
            fn()
        ts.append((time.perf_counter() - t) / k)
    return min(ts) if best else statistics.median(ts)


def measure_bandwidth() -> dict:
    """Peak read bandwidth (sum of a 512 MB tensor) and copy bandwidth (read + write), GB/s."""
    x = torch.ones(128 * 2**20)  # 512 MB float32
    y = torch.empty_like(x)
    nb = x.numel() * 4
    read = nb / _time_s(lambda: x.sum(), best=True) / GB
    copy = 2 * nb / _time_s(lambda: y.copy_(x), best=True) / GB
    return {"read_gbs": read, "copy_gbs": copy}


@torch.inference_mode()
def measure_gemm(d: Dims, M: int, dtype: torch.dtype) -> dict:
    """GFLOP/s at M rows on the decode step's weight shapes, two ways:
    "model": one pass over distinct weights shaped and counted as the model's (all of them: 0.4 GB in
    float32 for the default model, more than the caches, so weights stream from memory as in a real step);
    "hot": each shape alone, repeated on one weight (cache-hot: the GEMM kernels' peak).
    Each way with `F.linear` and, where forklm packs weights (float32 on CPU), with oneDNN on prepacked
    weights (cpu_linear.py); the faster of the two is the rate (`f_linear_*` / `packed_*` keep both)."""
    kernels = {"f_linear": (lambda w: w, F.linear)}
    if dtype == torch.float32 and packing_available():
        op = packed_linear_op()
        kernels["packed"] = (lambda w: torch.ops.mkldnn._reorder_linear_weight(w, PACK_ROWS_HINT),
                             lambda x, w: op(x, w, None))
    xs = {i: torch.full((M, i), 0.5, dtype=dtype) for _, i, _ in d.linears}
    shapes = [(o, i) for o, i, c in d.linears for _ in range(c)]
    flops = sum(2 * M * o * i for o, i in shapes)
    out = {}
    for name, (prep, lin) in kernels.items():
        ws = [prep(torch.full((o, i), 0.01, dtype=dtype)) for o, i in shapes]
        out[f"{name}_model"] = flops / _time_s(lambda: [lin(xs[w.shape[1]], w) for w in ws], reps=3, best=True) / GB
        del ws
        hot_s = 0.0
        for o, i, c in d.linears:
            w = prep(torch.full((o, i), 0.01, dtype=dtype))
            hot_s += c * _time_s(lambda: lin(xs[i], w), reps=3, best=True)
        out[f"{name}_hot"] = flops / hot_s / GB
    return {"model": max(v for k, v in out.items() if k.endswith("_model")),
            "hot": max(v for k, v in out.items() if k.endswith("_hot")), **out}


def floor_ms(d: Dims, n: int, L: int, t: float, es: int, bw: float, rate: float) -> dict:
    """max(bytes / BW, FLOPs / rate): weights once + prompt KV once + each sample's own KV."""
    nbytes = (d.matmul_params + d.norm_params + n * d.E) * es + d.kv_token_bytes(es) * (L + n * t)
    flops = 2 * d.matmul_params * n + 4 * (L + t) * d.D * d.H * d.layers * n
    return {"floor_ms": 1e3 * max(nbytes / (bw * GB), flops / (rate * GB)), "floor_bytes": nbytes, "floor_flops": flops}


class Rates:
    """The best read bandwidth and GEMM rates seen: re-measured before every cell and the maximum kept,
    since on a shared machine any one measurement may land in another process's busy second."""

    def __init__(self, d: Dims):
        self.d, self.bw, self.copy_bw, self.gemm, self.samples = d, 0.0, 0.0, {}, 0

    def sample(self, dtype_name: str, n: int) -> None:
        b = measure_bandwidth()
        self.bw, self.copy_bw = max(self.bw, b["read_gbs"]), max(self.copy_bw, b["copy_gbs"])
        key, new = f"{dtype_name}/M={n}", measure_gemm(self.d, n, DTYPES[dtype_name])
        old = self.gemm.get(key, {})
        self.gemm[key] = {k: max(old.get(k, 0.0), new[k]) for k in new}
        self.samples += 1

    def rate(self, dtype_name: str, n: int, kind: str = "model") -> float:
        return self.gemm[f"{dtype_name}/M={n}"][kind]

    def compute_rate(self, dtype_name: str, n: int, kind: str = "model") -> float:
        """The FLOP term's rate: at M < 64 a GEMM is bound by memory, which the bytes term already
        counts, so the rate at M=64 serves as the floor's compute rate there."""
        return max(self.rate(dtype_name, n, kind), self.rate(dtype_name, 64, kind))

    def floor(self, c: dict) -> dict:
        """The floor with the model-pass GEMM rate (and, for reference, with the cache-hot rate)."""
        es, args = DTYPES[c["dtype"]].itemsize, (self.d, c["n"], c["L"], c["t_decoded"])
        fl = floor_ms(*args, es, self.bw, self.compute_rate(c["dtype"], c["n"]))
        hot = floor_ms(*args, es, self.bw, self.compute_rate(c["dtype"], c["n"], "hot"))["floor_ms"]
        return {**fl, "ratio": c["step_ms"] / fl["floor_ms"], "ratio_min": c["step_min_ms"] / fl["floor_ms"],
                "floor_hot_ms": hot, "ratio_hot": c["step_ms"] / hot}


# ---- memory formulas ----------------------------------------------------------------------------
def kv_bytes(mode: str, d: Dims, n: int, L: int, T: int, dtype: torch.dtype) -> int:
    if mode == "hf":  # DynamicCache: every row holds prompt + generated, plus the prefill's MLP activations
        es = dtype.itemsize
        return d.kv_token_bytes(es) * n * (L + T) + 3 * n * L * d.I * es
    per_token = bytes_per_token(d.fcfg, dtype)
    return per_token * n * (L + T) if mode == "replicated" else per_token * (L + n * T)


def max_n_fits(mode: str, d: Dims, L: int, T: int, dtype: torch.dtype, budget: float) -> int:
    free = budget - d.weight_bytes(dtype.itemsize)
    lo, hi = 0, 1
    while kv_bytes(mode, d, hi, L, T, dtype) <= free and hi < 1 << 24:
        lo, hi = hi, hi * 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if kv_bytes(mode, d, mid, L, T, dtype) <= free else (lo, mid)
    return lo


def _busy_s() -> tuple[float, float, float]:
    """(CPU seconds used by the whole machine, by this process, wall clock)."""
    me, own = psutil.Process(), 0.0
    for p in [me, *me.children(recursive=True)]:  # children: torch.compile's workers and C++ compilers
        try:
            c = p.cpu_times()
            own += c.user + c.system + c.children_user + c.children_system
        except psutil.Error:
            pass
    t = psutil.cpu_times()
    return sum(t) - t.idle - getattr(t, "iowait", 0.0), own, time.perf_counter()


def others_cores(since: tuple[float, float, float]) -> float:
    """Cores used by other processes since `since` (the machine is shared)."""
    busy, own, wall = _busy_s()
    return max(0.0, (busy - since[0]) - (own - since[1])) / max(wall - since[2], 1e-3)


def wait_quiet(max_wait: float, threshold: float = 0.25) -> float:
    """Wait (up to max_wait s) for a 1 s window where other processes use < threshold cores."""
    t_end = time.perf_counter() + max_wait
    while True:
        mark = _busy_s()
        time.sleep(1.0)
        used = others_cores(mark)
        if used < threshold or time.perf_counter() > t_end:
            return used


class Monitor:
    """Peak resident memory of this process and other processes' CPU use while the block runs."""

    def __enter__(self):
        self.proc, self.peak, self._stop = psutil.Process(), 0, threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._mark = _busy_s()
        self._thread.start()
        return self

    def _poll(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.proc.memory_info().rss)
            self._stop.wait(0.02)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.proc.memory_info().rss)
        self.others = others_cores(self._mark)


# ---- one cell per engine ------------------------------------------------------------------------
def bench_forklm(llm: LLM, compiled: bool, n: int, prompt: list[int], T: int, steps: int) -> dict:
    if compiled:
        torch._dynamo.reset()  # one compile per cell, from scratch (and clear of the recompile limit)
    engine = llm.make_engine(CacheShape(1, n, n, len(prompt), T))
    engine.add_request("r", prompt, SamplingParams(n=n, max_tokens=T, temperature=1.0, seed=0, ignore_eos=True))
    t0 = time.perf_counter()
    engine.step()  # prefill + first token of every sample
    ttft = time.perf_counter() - t0
    warm = []
    for _ in range(2 if compiled else 1):  # compiled: the first decode step compiles
        t = time.perf_counter()
        engine.step()
        warm.append(time.perf_counter() - t)
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        engine.step()
        times.append(time.perf_counter() - t)
    step = statistics.median(times)
    model_s = []
    plan = engine.scheduler.schedule()[0].decode  # the next step's plan (nothing to admit: schedule is pure here)
    with torch.inference_mode():  # model-only: the (compiled) decode; rewrites the same cache slot
        for _ in range(3):
            t = time.perf_counter()
            engine.runner.decode(plan, engine.storage.pool, engine._next_tokens[plan.pool_rows])
            model_s.append(time.perf_counter() - t)
    out = {"ttft_s": ttft, "step_ms": 1e3 * step, "step_min_ms": 1e3 * min(times), "model_ms": 1e3 * statistics.median(model_s), "step_all_ms": [1e3 * x for x in times],
           "kv_bytes": engine.storage.nbytes(), "t_decoded": 1 + len(warm) + steps / 2}
    if compiled:
        out["compile_s"] = warm[0] - step
    return out


def bench_hf(model, n: int, prompt: list[int], steps: int) -> dict:
    """generate(num_return_sequences=n); a logits processor stamps the time of every new token."""
    from transformers import LogitsProcessor, LogitsProcessorList

    class Stamp(LogitsProcessor):
        def __init__(self):
            self.times = []

        def __call__(self, input_ids, scores):
            self.times.append(time.perf_counter())
            return scores

    stamp, new = Stamp(), 2 + steps
    ids = torch.tensor([prompt])
    t0 = time.perf_counter()
    model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=True, num_return_sequences=n,
                   max_new_tokens=new, min_new_tokens=new, top_k=0, top_p=1.0, temperature=1.0,
                   pad_token_id=0, logits_processor=LogitsProcessorList([stamp]))
    total = time.perf_counter() - t0
    gaps = [b - a for a, b in zip(stamp.times, stamp.times[1:])][1:]  # drop the first decode step (warm-up)
    es = model.dtype.itemsize
    kv = 2 * model.config.num_hidden_layers * n * (len(prompt) + new) * model.config.num_key_value_heads * \
        (model.config.hidden_size // model.config.num_attention_heads) * es
    return {"ttft_s": stamp.times[0] - t0, "step_ms": 1e3 * statistics.median(gaps), "step_min_ms": 1e3 * min(gaps),
            "model_ms": None,
            "step_all_ms": [1e3 * g for g in gaps], "kv_bytes": kv, "total_s": total, "t_decoded": 2 + steps / 2}


def profile_step(folder: str, dtype_name: str, n: int, prompt: list[int], T: int, steps: int = 3) -> tuple[dict, str]:
    """Where a bifurcated eager decode step spends its time: torch.profiler over `steps` steps, with
    labels wrapped (here, not in forklm) around the model, its attention calls, sampling and bookkeeping."""
    from contextlib import ExitStack
    from unittest import mock

    import forklm.engine.engine as fe
    from forklm.attention.cascade import DecodeAttention
    from torch.profiler import ProfilerActivity, profile, record_function

    def labelled(fn, label):
        def run(*a, **k):
            with record_function(label):
                return fn(*a, **k)
        return run

    llm = load("bifurcated", folder, dtype_name)
    engine = llm.make_engine(CacheShape(1, n, n, len(prompt), T))
    engine.add_request("r", prompt, SamplingParams(n=n, max_tokens=T, temperature=1.0, seed=0, ignore_eos=True))
    for _ in range(3):
        engine.step()
    with ExitStack() as stack:
        for obj, name, label in ((engine.runner, "decode", "model"), (DecodeAttention, "attend", "attention"),
                                 (engine, "_bookkeep", "bookkeeping"), (fe, "process_logits", "sampling"),
                                 (engine, "_sample", "sampling")):
            stack.enter_context(mock.patch.object(obj, name, labelled(getattr(obj, name), label)))
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(steps):
                with record_function("step"):
                    engine.step()
    ev = {e.key: e for e in prof.key_averages()}
    ms = lambda key, attr="cpu_time_total": getattr(ev[key], attr) / 1e3 / steps if key in ev else 0.0  # noqa: E731
    # F.linear's GEMMs, and oneDNN's for the float32 linears forklm packs (cpu_linear.py)
    linears = sum(ms(k, "self_cpu_time_total") for k in ("aten::mm", "aten::addmm", "mkldnn::_linear_pointwise"))
    parts = {"step": ms("step"), "linears (aten::mm/addmm, mkldnn linear)": linears, "attention (DecodeAttention.attend)": ms("attention"),
             "rest of model (norms, rope, silu, residual, embedding)": ms("model") - linears - ms("attention"),
             "sampling (process_logits + sample)": ms("sampling"), "bookkeeping (Python per token)": ms("bookkeeping")}
    parts["rest of step (logits buffer, history, where)"] = parts["step"] - sum(list(parts.values())[1:])
    text = f"bifurcated eager, {dtype_name}, n={n}, L={len(prompt)}: ms per step under torch.profiler\n" + "".join(
        f"  {k:58s} {v:8.1f} ms  {100 * v / parts['step']:5.1f}%\n" for k, v in parts.items())
    text += "\n" + prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20, max_name_column_width=50)
    return parts, text


# ---- the grid -----------------------------------------------------------------------------------
def predict_s(mode: str, d: Dims, n: int, L: int, es: int, rates: dict, steps: int, ttft1: float | None) -> float:
    """A rough upper estimate of a cell's wall time, to skip cells over the time cap before running them."""
    flops = 2 * d.matmul_params * L + 2 * L * L * d.D * d.H * d.layers
    prefill = ttft1 if ttft1 is not None else flops / (rates["prefill_rate"] * GB)
    kv_read = d.kv_token_bytes(es) * n * L / (rates["bw"] * GB)
    step = 2 * floor_ms(d, n, L, 0, es, rates["bw"], rates["rate"])["floor_ms"] / 1e3
    if mode == "hf":  # prefills n times; DynamicCache's torch.cat re-copies the whole cache each step
        return 1.7 * n * prefill + (steps + 2) * (step + 3 * kv_read)  # 1.7: measured at n=64, L=2048
    if mode == "replicated":
        return prefill + kv_read + (steps + 2) * (step + kv_read)
    return prefill + (steps + 2) * step + (60 if mode == "bifurcated-compiled" else 0)


def measure_cell(args, model, mode: str, dtype_name: str, n: int, prompt: list[int], T: int, rates: Rates,
                 est: float) -> dict:
    """Run one cell after waiting for a quiet CPU; while other processes took > 0.3 cores during it and
    it is short (predicted < --retry-below s), run it again: the attempt with the lowest median step is kept
    (contention only adds time). Every attempt's contention is recorded."""
    best, attempts = None, []
    for _ in range(1 + (args.retries if est < args.retry_below else 0)):
        gc.collect()
        quiet = wait_quiet(args.quiet_wait)
        rates.sample(dtype_name, n)  # between cells: the floor uses the best of all samples
        try:
            with Monitor() as mon:
                if mode == "hf":
                    r = bench_hf(model, n, prompt, args.steps)
                else:
                    r = bench_forklm(model, mode.endswith("compiled"), n, prompt, T, args.steps)
        except Exception as e:  # noqa: BLE001 - record and go on with the grid
            return {"skipped": f"failed: {type(e).__name__}: {str(e)[:200]}"}
        r.update(peak_rss_gb=mon.peak / GB, others_cores=mon.others, quiet_before=quiet)
        attempts.append(round(mon.others, 2))
        if best is None or r["step_ms"] < best["step_ms"]:
            best = r
        if mon.others < 0.3:
            break
    return {**best, "attempts_others_cores": attempts}


def run_cells(args, d: Dims, folder: str, dtype_name: str, rates: Rates, report) -> list[dict]:
    dtype, es, cells, ttft1 = DTYPES[dtype_name], DTYPES[dtype_name].itemsize, [], {}
    gen = torch.Generator().manual_seed(0)
    prompts = {L: torch.randint(0, d.V, (L,), generator=gen).tolist() for L in args.lens}
    T = max(args.gen_tokens, args.steps + 4)
    rates.sample(dtype_name, 64)  # for the prefill-time predictions
    for mode in args.modes:
        model = None
        for L in args.lens:
            for n in args.ns:
                if (mode == "bifurcated-compiled" and args.compiled_cells
                        and f"{n}x{L}" not in args.compiled_cells.split(",")):
                    continue
                cell = {"dtype": dtype_name, "mode": mode, "L": L, "n": n}
                if f"{dtype_name}/M={n}" not in rates.gemm:
                    rates.sample(dtype_name, n)
                mem = d.weight_bytes(es) + kv_bytes(mode, d, n, L, T, dtype)
                big = max(v["model"] for k, v in rates.gemm.items() if k.startswith(dtype_name + "/"))
                est = predict_s(mode, d, n, L, es, {"bw": rates.bw, "rate": rates.rate(dtype_name, n), "prefill_rate": big},
                                args.steps, ttft1.get(L))
                cell.update(predicted_mem_gb=mem / GB, predicted_s=est)
                if mem > args.mem_budget_gb * GB:
                    cell["skipped"] = f"predicted {mem / GB:.1f} GB > budget {args.mem_budget_gb:.1f} GB"
                elif est > args.time_cap:
                    cell["skipped"] = f"predicted {est:.0f}s > cap {args.time_cap:.0f}s"
                else:
                    if model is None:
                        model = load(mode, folder, dtype_name)
                    cell.update(measure_cell(args, model, mode, dtype_name, n, prompts[L], T, rates, est))
                if "step_ms" in cell:
                    if mode == "bifurcated":  # its prefill runs once whatever n: HF's time is about n of them
                        ttft1.setdefault(L, cell["ttft_s"])
                    T_nom = args.gen_tokens
                    cell.update(rates.floor(cell), tokens_per_s=n * 1e3 / cell["step_ms"],
                                mem_gb=(d.weight_bytes(es) + cell["kv_bytes"]) / GB,
                                per_token_ms=1e3 * (cell["ttft_s"] + (T_nom - 1) * cell["step_ms"] / 1e3) / (n * T_nom))
                cells.append(cell)
                report(cell)
        del model
        gc.collect()
    return cells


def load(mode: str, folder: str, dtype_name: str):
    """The model of a mode, warmed up on a short prompt (one-time library set-up stays out of cell 1)."""
    if mode == "hf":
        from transformers import LlamaForCausalLM

        model = LlamaForCausalLM.from_pretrained(folder, dtype=DTYPES[dtype_name]).eval()
        model.generate(torch.ones(1, 16, dtype=torch.long), max_new_tokens=2, do_sample=True, pad_token_id=0)
        return model
    layout = "replicated" if mode == "replicated" else "bifurcated"
    llm = LLM(folder, dtype=dtype_name, kv_layout=layout, compile=mode.endswith("compiled"), memory_fraction=1.0)
    if not llm.compile:  # a compiled warm-up would compile a shape of its own
        llm.generate(prompt_token_ids=[[1] * 16], sampling_params=SamplingParams(n=2, max_tokens=3))
    return llm


# ---- output ---------------------------------------------------------------------------------------
COLS = [("dtype", "{}"), ("L", "{}"), ("n", "{}"), ("mode", "{}"), ("step_ms", "{:.1f}"), ("step_min_ms", "{:.1f}"),
        ("model_ms", "{:.1f}"),
        ("floor_ms", "{:.1f}"), ("ratio", "{:.2f}"), ("ratio_min", "{:.2f}"), ("tokens_per_s", "{:.0f}"), ("ttft_s", "{:.2f}"),
        ("per_token_ms", "{:.2f}"), ("mem_gb", "{:.2f}"), ("peak_rss_gb", "{:.2f}"), ("compile_s", "{:.0f}"), ("others_cores", "{:.2f}")]


def row_text(c: dict) -> list[str]:
    if "skipped" in c:
        return [str(c[k]) for k, _ in COLS[:4]] + [f"skipped: {c['skipped']}"] + [""] * (len(COLS) - 5)
    return [fmt.format(c[k]) if c.get(k) is not None else "-" for k, fmt in COLS]


def markdown(res: dict) -> str:
    head = [k for k, _ in COLS]
    lines = [f"# Decode benchmark: {res['host']['cpu']}, {res['host']['threads']} threads, "
             f"{res['host']['cpu_capability']}", "", f"Command: `{res['command']}`", "",
             f"Model: {res['model']}. Floor from the best of {res['rates']['samples']} measurements in this run: "
             f"read bandwidth {res['rates']['read_gbs']:.1f} GB/s; GEMM GFLOP/s (the faster of F.linear and oneDNN on "
             "prepacked weights, float32) over the decode step's own weights (model pass; cache-hot per shape in "
             "brackets, the floor_hot_ms/ratio_hot of the JSON): "
             + ", ".join(f"{k} {v['model']:.0f} ({v['hot']:.0f}; F.linear {v['f_linear_model']:.0f})"
                         for k, v in res["rates"]["gemm_gflops"].items())
             + ". "
             f"Load average start {res['load_start']}, end {res.get('load_end')} (shared machine). "
             f"per_token_ms = (TTFT + {res['args']['gen_tokens'] - 1} x step) / (n x {res['args']['gen_tokens']}).", "",
             *[f"Merged re-run (cells it measured keep their best round): `{r['command']}`" for r in res.get("merged_runs", [])],
             "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(row_text(c)) + " |" for c in res["cells"]]
    lines += ["", "## Speedups (same dtype, L, n)", "", "| dtype | L | n | bif vs repl (step) | bif-compiled vs repl "
              "(step) | bif vs HF (per token) | TTFT(n)/TTFT(n=1), bif |", "|---|---|---|---|---|---|---|"]
    lines += [f"| {s['dtype']} | {s['L']} | {s['n']} | " + " | ".join(
        "-" if s[k] is None else f"{s[k]:.2f}x" for k in ("bif_vs_repl", "comp_vs_repl", "bif_vs_hf", "ttft_growth")) + " |"
        for s in res["speedups"]]
    lines += ["", f"## Largest n that fits {res['args']['mem_budget_gb']:.1f} GB (weights + KV formulas; HF also "
              "its prefill MLP activations)", "", "| dtype | L | " + " | ".join(res["max_n"][0]["by_mode"]) + " |",
              "|---|---|" + "---|" * len(res["max_n"][0]["by_mode"])]
    lines += [f"| {m['dtype']} | {m['L']} | " + " | ".join(str(v) for v in m["by_mode"].values()) + " |" for m in res["max_n"]]
    if res.get("targets"):
        lines += ["", "## Targets (float32, L=2048, n=64)", ""] + [f"- {t}" for t in res["targets"]]
    return "\n".join(lines) + "\n"


def merge_rounds(cells: list[dict]) -> list[dict]:
    """One cell per (dtype, mode, L, n): the round with the lowest median step, every round's median kept."""
    best: dict = {}
    for c in cells:
        key = (c["dtype"], c["mode"], c["L"], c["n"])
        prev = best.get(key)
        mine = c.get("rounds_step_ms") or ([round(c["step_ms"], 1)] if "step_ms" in c else [])
        rounds = (prev or {}).get("rounds_step_ms", []) + mine
        if prev is None or ("step_ms" in c and c["step_ms"] < prev.get("step_ms", float("inf"))):
            prev = c
        best[key] = {**prev, "rounds_step_ms": rounds}
    return list(best.values())


def speedups(cells: list[dict]) -> list[dict]:
    get = {(c["dtype"], c["L"], c["n"], c["mode"]): c for c in cells if "step_ms" in c}
    out = []
    for dt, L, n in sorted({k[:3] for k in get}):
        b, bc, r, h = (get.get((dt, L, n, m)) for m in MODES)
        b1 = get.get((dt, L, min(k[2] for k in get if k[:2] == (dt, L)), "bifurcated"))
        out.append({"dtype": dt, "L": L, "n": n, "bif_vs_repl": r["step_ms"] / b["step_ms"] if b and r else None,
                    "comp_vs_repl": r["step_ms"] / bc["step_ms"] if bc and r else None,
                    "bif_vs_hf": h["per_token_ms"] / b["per_token_ms"] if b and h else None,
                    "ttft_growth": b["ttft_s"] / b1["ttft_s"] if b and b1 else None})
    return out


def targets(cells: list[dict]) -> list[str]:
    get = {(c["mode"], c["n"]): c for c in cells if "step_ms" in c and c["dtype"] == "float32" and c["L"] == 2048}
    b, bc, r, h = (get.get((m, 64)) for m in MODES)
    out = []
    for name, c in (("eager", b), ("compiled", bc)):
        if c:
            out.append(f"step within 1.5x of floor ({name}): {c['ratio']:.2f}x -> {'met' if c['ratio'] <= 1.5 else 'NOT met'}")
    if b and r:
        best = min(x["step_ms"] for x in (b, bc) if x)
        out.append(f">= 3x faster than replicated: {r['step_ms'] / best:.2f}x -> {'met' if r['step_ms'] / best >= 3 else 'NOT met'}")
    if b and h:
        x = h["per_token_ms"] / b["per_token_ms"]
        out.append(f">= 20x faster per generated token than HF: {x:.1f}x -> {'met' if x >= 20 else 'NOT met'}")
    ttfts = [c["ttft_s"] for (m, _), c in get.items() if m == "bifurcated"]
    if len(ttfts) > 1:
        g = max(ttfts) / min(ttfts)
        out.append(f"TTFT flat in n (max/min <= 1.25 over n): {g:.2f} -> {'met' if g <= 1.25 else 'NOT met'}")
    return out


def plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = sorted({(c["dtype"], c["L"]) for c in res["cells"] if "step_ms" in c})
    if not panels:
        return
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 4), squeeze=False)
    for ax, (dt, L) in zip(axes[0], panels):
        done = [c for c in res["cells"] if "step_ms" in c and (c["dtype"], c["L"]) == (dt, L)]
        for mode in MODES:
            pts = sorted((c["n"], c["step_ms"]) for c in done if c["mode"] == mode)
            if pts:
                ax.plot(*zip(*pts), marker="o", label=mode, color=f"C{MODES.index(mode)}")  # one colour per mode
        fl = sorted({(c["n"], c["floor_ms"]) for c in done if c["mode"] == "bifurcated"})
        if fl:
            ax.plot(*zip(*fl), "k--", label="floor")
        ax.set(xscale="log", yscale="log", xlabel="n (samples)", ylabel="ms / decode step", title=f"{dt}, prompt {L}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"forklm decode step vs n ({res['host']['cpu']}, {res['host']['threads']} threads)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    csv = lambda f: lambda s: [f(x) for x in s.split(",") if x]  # noqa: E731
    ap.add_argument("--dtypes", type=csv(str), default=["float32", "bfloat16"])
    ap.add_argument("--ns", type=csv(int), default=[1, 4, 16, 64, 256])
    ap.add_argument("--lens", type=csv(int), default=[256, 2048, 8192])
    ap.add_argument("--modes", type=csv(str), default=list(MODES))
    ap.add_argument("--compiled-cells", default="", help="limit bifurcated-compiled to these NxL cells, e.g. 64x2048")
    ap.add_argument("--steps", type=int, default=8, help="timed decode steps per cell (after warm-up)")
    ap.add_argument("--gen-tokens", type=int, default=32, help="T: tokens per sample for per-token cost and cache size")
    ap.add_argument("--time-cap", type=float, default=120.0, help="skip cells predicted to take longer (s)")
    ap.add_argument("--mem-budget-gb", type=float, default=0.75 * available_memory_bytes(torch.device("cpu")) / GB)
    ap.add_argument("--kv-heads", type=int, default=None, help="key/value heads (GQA); default = query heads")
    ap.add_argument("--small", action="store_true", help="a tiny model, to check the logic")
    ap.add_argument("--quiet-wait", type=float, default=30.0,
                    help="before each cell, wait up to this long (s) for other processes to leave the CPUs")
    ap.add_argument("--profile", default="", help="NxL: also profile that bifurcated eager cell (first dtype)")
    ap.add_argument("--retries", type=int, default=2, help="re-runs of a short cell disturbed by other processes")
    ap.add_argument("--retry-below", type=float, default=60.0, help="only cells predicted under this many s are re-run")
    ap.add_argument("--rounds", type=int, default=1, help="repeat the grid; each cell keeps its best round")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--out", default="benchmarks/results/decode_cpu")
    ap.add_argument("--merge-into", default="", help="OUT.json of an earlier run: add these cells to it as one "
                    "more round (e.g. to re-run cells other processes disturbed); every cell keeps its best round")
    ap.add_argument("--render", default="", help="OUT.json of an earlier run: redo floors, tables and plot only")
    args = ap.parse_args()
    if bad := set(args.modes) - set(MODES):
        ap.error(f"unknown modes {bad}")
    if args.threads:
        torch.set_num_threads(args.threads)
    torch._inductor.config.force_disable_caches = True  # compile_s: a cold compile, as a first run sees it
    if args.render:  # recompute floors and tables from a result file (no measurement)
        res = json.loads(Path(args.render).read_text())
        a = argparse.Namespace(**res["args"])
        d = Dims(llama_config(a.small, a.kv_heads, max(a.lens) + a.gen_tokens + a.steps).to_dict())
        rates = Rates(d)
        rates.bw, rates.copy_bw = res["rates"]["read_gbs"], res["rates"]["copy_gbs"]
        rates.gemm, rates.samples = res["rates"]["gemm_gflops"], res["rates"]["samples"]
        return finish(res, a, d, rates, Path(args.render).with_suffix(""))
    cfg = llama_config(args.small, args.kv_heads, max(args.lens) + args.gen_tokens + args.steps)
    out = Path(args.merge_into).with_suffix("") if args.merge_into else Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    res = {"command": "python " + shlex.join(sys.argv), "args": vars(args), "host": host_info(),
           "code": code_version(), "load_start": os.getloadavg(), "cells": []}
    base = json.loads(Path(args.merge_into).read_text()) if args.merge_into else None
    print(f"host: {res['host']}\nload average: {res['load_start']}", flush=True)
    with tempfile.TemporaryDirectory() as folder:
        d = Dims(make_model(folder, cfg))
        res["model"] = (f"Llama E={d.E} layers={d.layers} H={d.H} Hkv={d.Hkv} I={d.I} V={d.V}, "
                        f"{(d.matmul_params + d.norm_params + d.V * d.E) / 1e6:.1f}M params "
                        f"({d.matmul_params / 1e6:.1f}M in decode matmuls)")
        rates = Rates(d)
        if base:  # re-running some cells of an earlier result: its rates count too
            rates.bw, rates.copy_bw = base["rates"]["read_gbs"], base["rates"]["copy_gbs"]
            rates.gemm, rates.samples = base["rates"]["gemm_gflops"], base["rates"]["samples"]
        print(res["model"], flush=True)
        print(" | ".join(k for k, _ in COLS), flush=True)

        def report(cell):
            print(" | ".join(row_text(cell)), flush=True)
            res["cells"].append(cell)
            out.with_suffix(".json").write_text(json.dumps(res, indent=1))

        for r in range(args.rounds):  # rounds interleave the modes, so slow drifts of the host hit them alike
            for dt in args.dtypes:
                run_cells(args, d, folder, dt, rates, lambda c: report({**c, "round": r}))
        if args.profile:
            n, L = (int(x) for x in args.profile.split("x"))
            prompt = torch.randint(0, d.V, (L,), generator=torch.Generator().manual_seed(0)).tolist()
            wait_quiet(args.quiet_wait)
            res["profile"], text = profile_step(folder, args.dtypes[0], n, prompt, max(args.gen_tokens, 8))
            Path(f"{out}_profile.txt").write_text(text)
            print(text, flush=True)
    res["load_end"], res["code_end"] = os.getloadavg(), code_version()
    if base:  # the earlier result stays the base (its grid and args); this run's cells join as one more round
        run = {k: res[k] for k in ("command", "code", "code_end", "load_start", "load_end")}
        base.setdefault("merged_runs", []).append(run)
        base["cells"] += [{**c, "round": f"merged run {len(base['merged_runs'])}"} for c in res["cells"]]
        res, args = base, argparse.Namespace(**base["args"])
    finish(res, args, d, rates, out)


def finish(res: dict, args, d: Dims, rates: Rates, out: Path) -> None:
    """Merge rounds, final floors (from the best rates of the whole run), tables, JSON, markdown, plot."""
    T = max(args.gen_tokens, args.steps + 4)
    res["max_n"] = [{"dtype": dt, "L": L, "by_mode": {m: max_n_fits(m, d, L, T, DTYPES[dt], args.mem_budget_gb * GB)
                                                     for m in ("bifurcated", "replicated", "hf")}}
                    for dt in args.dtypes for L in args.lens]
    res["cells"] = merge_rounds(res["cells"])
    for c in res["cells"]:
        if "step_ms" in c:
            c.update(rates.floor(c))
    res["rates"] = {"read_gbs": rates.bw, "copy_gbs": rates.copy_bw, "gemm_gflops": rates.gemm, "samples": rates.samples}
    res["speedups"], res["targets"] = speedups(res["cells"]), targets(res["cells"])
    out.with_suffix(".json").write_text(json.dumps(res, indent=1))
    out.with_suffix(".md").write_text(markdown(res))
    plot(res, out.with_suffix(".png"))
    print("\n" + markdown(res), flush=True)


if __name__ == "__main__":
    main()
