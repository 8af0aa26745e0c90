"""`forklm serve` under three workloads: verl-style sampling, cost follows load, head-of-line blocking.

Every timed cell gets a fresh server (`python -m forklm serve`, 127.0.0.1, a free port), so no
prefix is cached from an earlier cell; one short unrelated warm-up request precedes the timing.
Requests go to /v1/completions, streamed with stream_options.include_usage (the usage chunk gives
prompt_tokens and prompt_tokens_details.cached_tokens, recorded per request).

  verl  one long prompt (--prompt-tokens, default 1500), 32 samples of --max-tokens (32) tokens,
        temperature 1, ignore_eos: (a) 32 concurrent n=1 requests, seeds 0..31, vs (b) one request
        with n=32 (seed 0); (a) also on a --no-prefix-caching server. Wall time from the first send
        to the last response. Targets: (a)/(b) <= 1.3, (a) no caching / (a) caching >= 5.
  load  one n=1 request (--prompt-tokens, default 256; temperature 0, ignore_eos): ms per generated
        token from the stream ((last token - first token) / (tokens - 1)) vs the same request through
        `LLM.generate` in this process ((end to end - ttft_s) / (tokens - 1)), run after the server
        stopped; its warm-up is the same prompt behind one extra word (same shape, no shared prefix).
        Target: server / API <= 1.2.
  hol   a server with --prefill-chunk-tokens --chunk-tokens (512) and one with 100000 (whole prompts):
        a long prompt (--long-prompt-tokens, default 6000; n=1, max_tokens 4) and, 0.5 s later, a
        short one (~10 tokens, max_tokens 4). TTFT of each from its own send. Target (chunked):
        short TTFT / long TTFT <= 0.3.

Prompts repeat a fixed English paragraph, cut by characters; characters per token are measured
once per run on a server of its own (prompt_tokens of the paragraph's first 200 characters).
Reported token counts are the server's usage.prompt_tokens.

Reproduce (embedded SmolLM2; results in benchmarks/results/server_prefix_<exp>{.json,.md,.png}):

    python benchmarks/bench_server_prefix.py --exp verl
    python benchmarks/bench_server_prefix.py --exp load
    python benchmarks/bench_server_prefix.py --exp hol
    python benchmarks/bench_server_prefix.py --exp all        # the three, in that order

Smoke test on a tiny Hugging Face folder (context 256 tokens):

    python benchmarks/bench_server_prefix.py --model /tmp/tiny --exp all --prompt-tokens 60 \\
        --long-prompt-tokens 200 --chunk-tokens 16 --max-tokens 4 --out-suffix _smoke
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shlex
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx
import report
import sse

RESULTS = Path(__file__).resolve().parent / "results"
REPO = Path(__file__).resolve().parent.parent
PARAGRAPH = ("The old lighthouse stood at the edge of the cliff, its white paint worn thin by a century of salt "
             "and wind. Every evening the keeper climbed the narrow stairs, trimmed the wick, polished the great "
             "lens and watched the ships pass far below, counting their lights until the morning came. ")
SHORT_TEXT = "Name three colours of the rainbow, please, and say why the sky looks blue at noon."
WARMUP = "Hello"
SAMPLES = 32  # verl: samples of the one prompt
HOL_DELAY_S = 0.5  # hol: the short request goes this long after the long one
WHOLE_PROMPTS = 100000  # hol: a chunk larger than any prompt
REQUEST_TIMEOUT_S = 3600.0


@dataclass
class Stream:
    """One streamed request: times from its own send (s), counts from the usage chunk."""

    sent_s: float  # from the cell's start
    ttft_s: float | None = None
    last_token_s: float | None = None
    e2e_s: float | None = None
    chunks: int = 0
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    cached_tokens: int | None = None
    error: str | None = None


# ---- server ---------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def server(args: argparse.Namespace, flags: list[str], errors: list[str]):
    """A `forklm serve` with the run's flags plus `flags`, up once /health answers 200; yields its URL.
    Lines of its log that mention an error are appended to `errors` when it stops."""
    port = free_port()
    every = ([args.model] if args.model else []) + ["--host", "127.0.0.1", "--dtype", args.dtype]
    cmd = [sys.executable, "-m", "forklm", "serve", *every, *shlex.split(args.serve_args), *flags, "--port", str(port)]
    url = f"http://127.0.0.1:{port}"
    print("starting:", shlex.join(cmd), file=sys.stderr)
    with tempfile.TemporaryFile("w+") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        try:
            wait_healthy(proc, url, log)
            yield url
        finally:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(10)
            log.seek(0)
            errors += [ln.rstrip() for ln in log if "error" in ln.lower() or "traceback" in ln.lower()]


def wait_healthy(proc: subprocess.Popen, url: str, log, timeout: float = 300.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            log.seek(0)
            raise SystemExit(f"the server exited with {proc.returncode}:\n{log.read()[-3000:]}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise SystemExit(f"the server did not answer /health in {timeout:.0f} s")
        time.sleep(0.3)


def post(url: str, body: dict) -> dict:
    """A non-streamed completion (warm-up, calibration), to the server's one model."""
    model = httpx.get(url + "/v1/models", timeout=30).json()["data"][0]["id"]
    r = httpx.post(url + "/v1/completions", json={"model": model, **body}, timeout=REQUEST_TIMEOUT_S)
    if r.status_code != 200:
        raise SystemExit(f"{r.status_code} from the server: {r.text[:500]}")
    return r.json()


# ---- requests -------------------------------------------------------------------------------------
async def stream_request(client: httpx.AsyncClient, body: dict, t0: float) -> Stream:
    start = time.perf_counter()
    s = Stream(sent_s=start - t0)
    body = {**body, "stream": True, "stream_options": {"include_usage": True}}
    try:
        async for chunk in sse.chunks(client, "/v1/completions", body):
            now = time.perf_counter() - start
            if "error" in chunk:
                s.error = chunk["error"]["message"]
            if usage := chunk.get("usage"):
                s.prompt_tokens, s.completion_tokens = usage["prompt_tokens"], usage["completion_tokens"]
                s.cached_tokens = (usage.get("prompt_tokens_details") or {}).get("cached_tokens")
            if any(c.get("text") for c in chunk.get("choices") or []):
                s.chunks += 1
                s.ttft_s = now if s.ttft_s is None else s.ttft_s
                s.last_token_s = now
    except sse.StreamRefused as error:
        s.error = str(error)
    except httpx.HTTPError as error:
        s.error = f"{type(error).__name__}: {error}"
    s.e2e_s = time.perf_counter() - start
    return s


async def send_all(url: str, requests: list[tuple[float, dict]]) -> tuple[list[Stream], float]:
    """`requests` ((delay s, body)) sent concurrently; their streams and the wall time to the last one."""
    limits = httpx.Limits(max_connections=len(requests) + 4)
    async with httpx.AsyncClient(base_url=url, timeout=REQUEST_TIMEOUT_S, limits=limits) as client:
        model = (await client.get("/v1/models")).json()["data"][0]["id"]
        t0 = time.perf_counter()

        async def delayed(delay: float, body: dict) -> Stream:
            await asyncio.sleep(delay)
            return await stream_request(client, {"model": model, **body}, t0)

        streams = await asyncio.gather(*(delayed(d, b) for d, b in requests))
        return list(streams), time.perf_counter() - t0


def run_cell(args: argparse.Namespace, name: str, flags: list[str], requests: list[tuple[float, dict]]) -> dict:
    """A fresh server with `flags`, one warm-up request, then `requests` timed: the cell's record."""
    errors: list[str] = []
    with server(args, flags, errors) as url:
        post(url, {"prompt": WARMUP, "max_tokens": 2, "temperature": 0.0})
        load_before = os.getloadavg()
        streams, wall = asyncio.run(send_all(url, requests))
        load_after = os.getloadavg()
    cell = {"cell": name, "flags": flags, "wall_s": wall, "loadavg_before": load_before, "loadavg_after": load_after,
            "server_log_errors": errors[:20], "requests": [asdict(s) for s in streams]}
    for s in streams:
        if s.error:
            print(f"{name}: request error: {s.error}", file=sys.stderr)
    return cell


def num(x: float | None) -> float:
    """A measurement, NaN where a failed request has none (tables and ratios stay printable)."""
    return float("nan") if x is None else float(x)


def div(a: float | None, b: float | None) -> float:
    return num(a) / num(b) if b else float("nan")


def total(cell: dict, key: str) -> int:
    return sum(r[key] or 0 for r in cell["requests"])


def calibrate(args: argparse.Namespace) -> float:
    """Characters per token of PARAGRAPH (its first 200 characters: they fit a tiny model's context),
    from a server of its own (so that no cell sees them cached)."""
    text = PARAGRAPH[:200]
    with server(args, [], []) as url:
        tokens = post(url, {"prompt": text, "max_tokens": 1, "temperature": 0.0})["usage"]["prompt_tokens"]
    return len(text) / tokens


def make_prompt(text: str, tokens: int, chars_per_token: float) -> str:
    chars = max(1, round(tokens * chars_per_token))
    return (text * (chars // len(text) + 1))[:chars]


# ---- experiments ----------------------------------------------------------------------------------
def exp_verl(args: argparse.Namespace, cpt: float) -> dict:
    body = {"prompt": make_prompt(PARAGRAPH, args.prompt_tokens or 1500, cpt), "max_tokens": args.max_tokens,
            "temperature": 1.0, "ignore_eos": True}
    separate = [(0.0, {**body, "seed": seed}) for seed in range(SAMPLES)]
    cells = [run_cell(args, f"{SAMPLES} x n=1, caching", [], separate),
             run_cell(args, f"1 x n={SAMPLES}, caching", [], [(0.0, {**body, "n": SAMPLES, "seed": 0})]),
             run_cell(args, f"{SAMPLES} x n=1, no caching", ["--no-prefix-caching"], separate)]
    sep, joint, nocache = (c["wall_s"] for c in cells)
    ratios = {"separate / n=32 (target <= 1.3)": div(sep, joint),
              "separate: no caching / caching (target >= 5)": div(nocache, sep)}
    rows = [{"cell": c["cell"], "wall_s": c["wall_s"], "prompt_tokens": c["requests"][0]["prompt_tokens"],
             "cached": total(c, "cached_tokens"), "generated": total(c, "completion_tokens"),
             "errors": sum(bool(r["error"]) for r in c["requests"])} for c in cells]
    columns = [("cell", "cell", "{}"), ("wall s", "wall_s", "{:.2f}"), ("prompt tokens", "prompt_tokens", "{}"),
               ("cached tokens (sum)", "cached", "{}"), ("generated tokens", "generated", "{}"),
               ("errors", "errors", "{}")]
    return {"title": "verl-style sampling: 32 n=1 requests vs one n=32", "cells": cells, "ratios": ratios,
            "rows": rows, "columns": columns,
            "plot": ([r["cell"] for r in rows], {"wall s": [r["wall_s"] for r in rows]}, "seconds")}


def run_api(args: argparse.Namespace, prompt: str) -> dict:
    """The load request through `LLM.generate` in this process; the warm-up has the same shape, no shared prefix."""
    from forklm import LLM, SamplingParams

    load_before = os.getloadavg()
    llm = LLM(args.model, dtype=args.dtype)
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0.0, ignore_eos=True)
    llm.generate(["Again: " + prompt], params)
    t = time.perf_counter()
    out = llm.generate([prompt], params)[0]
    e2e = time.perf_counter() - t
    tokens, ttft = len(out.outputs[0].token_ids), out.metrics["ttft_s"]
    return {"cell": "API", "e2e_s": e2e, "ttft_s": ttft, "prompt_tokens": len(out.prompt_token_ids),
            "completion_tokens": tokens, "cached_tokens": out.num_cached_tokens,
            "ms_per_token": 1e3 * (e2e - ttft) / max(1, tokens - 1), "loadavg_before": load_before,
            "loadavg_after": os.getloadavg()}


def exp_load(args: argparse.Namespace, cpt: float) -> dict:
    prompt = make_prompt(PARAGRAPH, args.prompt_tokens or 256, cpt)
    body = {"prompt": prompt, "max_tokens": args.max_tokens, "temperature": 0.0, "ignore_eos": True, "seed": 0}
    cell = run_cell(args, "server", [], [(0.0, body)])
    r = cell["requests"][0]
    cell["ms_per_token"] = 1e3 * (num(r["last_token_s"]) - num(r["ttft_s"])) / max(1, (r["completion_tokens"] or 0) - 1)
    api = run_api(args, prompt)  # the server has stopped
    rows = [{"cell": "server", "ms": cell["ms_per_token"], "ttft": num(r["ttft_s"]), "prompt": r["prompt_tokens"],
             "gen": r["completion_tokens"], "cached": r["cached_tokens"]},
            {"cell": "API", "ms": api["ms_per_token"], "ttft": api["ttft_s"], "prompt": api["prompt_tokens"],
             "gen": api["completion_tokens"], "cached": api["cached_tokens"]}]
    columns = [("path", "cell", "{}"), ("ms / token", "ms", "{:.2f}"), ("TTFT s", "ttft", "{:.3f}"),
               ("prompt tokens", "prompt", "{}"), ("generated", "gen", "{}"), ("cached tokens", "cached", "{}")]
    return {"title": "cost follows load: one n=1 request, server vs Python API", "cells": [cell, api],
            "ratios": {"server / API ms per token (target <= 1.2)": div(cell["ms_per_token"], api["ms_per_token"])},
            "rows": rows, "columns": columns,
            "plot": ([r["cell"] for r in rows], {"ms / token": [r["ms"] for r in rows]}, "ms per generated token")}


def exp_hol(args: argparse.Namespace, cpt: float) -> dict:
    long = {"prompt": make_prompt(PARAGRAPH, args.long_prompt_tokens, cpt), "max_tokens": 4, "temperature": 0.0,
            "ignore_eos": True}
    short = {"prompt": make_prompt(SHORT_TEXT, 10, cpt), "max_tokens": 4, "temperature": 0.0, "ignore_eos": True}
    cells, rows = [], []
    for name, chunk in ((f"chunked ({args.chunk_tokens})", args.chunk_tokens), ("whole prompts", WHOLE_PROMPTS)):
        cell = run_cell(args, name, ["--prefill-chunk-tokens", str(chunk)], [(0.0, long), (HOL_DELAY_S, short)])
        lo, sh = cell["requests"]
        cells.append(cell)
        rows.append({"cell": name, "long_prompt": lo["prompt_tokens"], "long_ttft": num(lo["ttft_s"]),
                     "long_e2e": num(lo["e2e_s"]), "short_prompt": sh["prompt_tokens"], "short_ttft": num(sh["ttft_s"]),
                     "ratio": div(sh["ttft_s"], lo["ttft_s"]), "cached": lo["cached_tokens"],
                     "overlap": num(lo["ttft_s"]) > sh["sent_s"] - lo["sent_s"]})
    columns = [("server", "cell", "{}"), ("long prompt tokens", "long_prompt", "{}"),
               ("long TTFT s", "long_ttft", "{:.3f}"), ("long e2e s", "long_e2e", "{:.3f}"),
               ("short prompt tokens", "short_prompt", "{}"), ("short TTFT s", "short_ttft", "{:.3f}"),
               ("short TTFT / long TTFT", "ratio", "{:.3f}"), ("long cached tokens", "cached", "{}"),
               ("long prefill still running at short's send", "overlap", "{}")]
    ratios = {"short TTFT (chunked) / long TTFT (chunked) (target <= 0.3)": rows[0]["ratio"],
              "short TTFT (chunked) / long TTFT (whole prompts)": div(rows[0]["short_ttft"], rows[1]["long_ttft"])}
    plot = ([r["cell"] for r in rows], {"long TTFT s": [r["long_ttft"] for r in rows],
                                        "short TTFT s": [r["short_ttft"] for r in rows]}, "seconds")
    return {"title": "head-of-line: a short request behind a long prefill", "cells": cells, "rows": rows,
            "ratios": ratios, "columns": columns, "plot": plot}


# ---- output ---------------------------------------------------------------------------------------
def bar_plot(path: Path, labels: list[str], series: dict[str, list[float]], ylabel: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    width = 0.8 / len(series)
    for i, (name, values) in enumerate(series.items()):
        ax.bar([x + i * width for x in range(len(labels))], values, width, label=name)
    ax.set_xticks([x + width * (len(series) - 1) / 2 for x in range(len(labels))], labels, fontsize=8)
    ax.set(ylabel=ylabel, title=title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def git_commit() -> dict:
    run = lambda *a: subprocess.run(["git", *a], cwd=REPO, capture_output=True, text=True).stdout.strip()  # noqa: E731
    return {"commit": run("rev-parse", "--short", "HEAD"), "dirty": bool(run("status", "--porcelain"))}


def write(args: argparse.Namespace, exp: str, result: dict, cpt: float) -> None:
    out = RESULTS / f"server_prefix_{exp}{args.out_suffix}"
    res = {"command": report.command(), "host": report.host(), "git": git_commit(), "settings": vars(args),
           "chars_per_token": cpt, "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
           **{k: result[k] for k in ("title", "ratios", "rows", "cells")}}
    note = "Ratios: " + "; ".join(f"{k}: **{v:.3f}**" for k, v in result["ratios"].items())
    report.write(out, res, result["title"], note, result["columns"], result["rows"])
    bar_plot(out.with_suffix(".png"), *result["plot"], title=result["title"])
    print(out.with_suffix(".md").read_text())
    print(f"wrote {out}.json, .md, .png\n")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--exp", choices=["verl", "load", "hol", "all"], default="all")
    p.add_argument("--model", default=None, help="Hugging Face folder (default: the embedded SmolLM2 GGUF)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--prompt-tokens", type=int, default=None, help="verl and load: prompt length target "
                   "(default: verl 1500, load 256)")
    p.add_argument("--long-prompt-tokens", type=int, default=6000, help="hol: the long prompt's target (default 6000)")
    p.add_argument("--chunk-tokens", type=int, default=512, help="hol: --prefill-chunk-tokens of the chunked server")
    p.add_argument("--max-tokens", type=int, default=32, help="verl and load: max_tokens per sample (default 32)")
    p.add_argument("--out-suffix", default="", help="appended to the result file names")
    p.add_argument("--serve-args", default="", help="extra flags for every server, one string (shlex-split)")
    args = p.parse_args(argv)

    cpt = calibrate(args)
    print(f"{cpt:.2f} characters per token", file=sys.stderr)
    experiments = {"verl": exp_verl, "load": exp_load, "hol": exp_hol}
    for exp in experiments if args.exp == "all" else [args.exp]:
        write(args, exp, experiments[exp](args, cpt), cpt)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
