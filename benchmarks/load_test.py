"""Load test of `forklm serve`: R requests with n samples each, C at a time, streamed.

Reports requests/s, generated tokens/s, time to first token (TTFT), inter-token latency (ITL: the
gap between consecutive tokens of one sample) and end-to-end latency percentiles, as a table on
stdout and a JSON file under benchmarks/results/ that also records the command line.

    # against a running server
    python benchmarks/load_test.py --url http://127.0.0.1:8000 -R 16 -n 4 -c 4 --max-tokens 32
    # start one (default model unless --model), run, stop it
    python benchmarks/load_test.py --start-server -R 16 -n 4 -c 4 --max-tokens 32 \\
        --serve-args "--max-batch 16 --max-prompts 4 --max-tokens 64"

Requests use /v1/completions with stream=true, logprobs=0 (so every chunk names its tokens) and
stream_options.include_usage; `--ignore-eos` makes every sample run to max_tokens.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shlex
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import sse

RESULTS = Path(__file__).resolve().parent / "results"
PROMPTS = [
    "Write a short story about a lighthouse keeper who finds a message in a bottle.",
    "Explain, step by step, how to make a cup of tea.",
    "List three interesting facts about octopuses and explain each one.",
    "Describe the city of Paris to someone who has never been there.",
]


@dataclass
class RequestResult:
    start: float
    ttft: float | None = None
    end: float | None = None
    itl: list[float] = field(default_factory=list)  # gaps between consecutive tokens of one sample
    tokens: int = 0  # counted from the chunks
    usage_tokens: int | None = None  # the server's usage count
    error: str | None = None


async def one_request(client: httpx.AsyncClient, body: dict) -> RequestResult:
    result = RequestResult(start=time.perf_counter())
    last: dict[int, float] = {}
    try:
        async for chunk in sse.chunks(client, "/v1/completions", body):
            if "error" in chunk:
                result.error = chunk["error"]["message"]
                continue
            if chunk.get("usage"):
                result.usage_tokens = chunk["usage"]["completion_tokens"]
            now = time.perf_counter()
            for choice in chunk["choices"]:
                count = len((choice.get("logprobs") or {}).get("tokens") or []) or (1 if choice["text"] else 0)
                if not count:
                    continue
                result.tokens += count
                if result.ttft is None:
                    result.ttft = now - result.start
                index = choice["index"]
                if index in last:
                    result.itl.append(now - last[index])
                last[index] = now
    except sse.StreamRefused as error:
        result.error = str(error)[:200]
        result.end = time.perf_counter()
        return result
    except httpx.HTTPError as error:
        result.error = f"{type(error).__name__}: {error}"
    result.end = time.perf_counter()
    return result


async def run_load(url: str, args: argparse.Namespace, model: str) -> tuple[list[RequestResult], float]:
    semaphore = asyncio.Semaphore(args.concurrency)
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    limits = httpx.Limits(max_connections=args.concurrency + 4)
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=args.timeout, limits=limits) as client:

        async def limited(i: int) -> RequestResult:
            body = {
                "model": model,
                "prompt": PROMPTS[i % len(PROMPTS)],
                "n": args.n,
                "max_tokens": args.max_tokens,
                "temperature": args.temperature,
                "seed": args.seed + i,
                "stream": True,
                "stream_options": {"include_usage": True},
                "logprobs": 0,
                "ignore_eos": args.ignore_eos,
            }
            async with semaphore:
                return await one_request(client, body)

        t0 = time.perf_counter()
        results = await asyncio.gather(*(limited(i) for i in range(args.requests)))
        return list(results), time.perf_counter() - t0


def percentiles(values: list[float]) -> dict:
    if not values:
        return {"count": 0}
    ordered = sorted(values)

    def q(p: float) -> float:
        return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]

    return {"count": len(values), "mean": statistics.fmean(values), "p50": q(50), "p90": q(90), "p99": q(99),
            "max": ordered[-1]}


def summarize(results: list[RequestResult], wall: float) -> dict:
    ok = [r for r in results if r.error is None]
    tokens = sum(r.usage_tokens if r.usage_tokens is not None else r.tokens for r in ok)
    return {
        "requests": len(results),
        "failed": len(results) - len(ok),
        "errors": sorted({r.error for r in results if r.error})[:5],
        "wall_s": wall,
        "requests_per_s": len(ok) / wall,
        "generated_tokens": tokens,
        "generated_tokens_per_s": tokens / wall,
        "tokens_counted_equal_usage": all(r.usage_tokens == r.tokens for r in ok),
        "ttft_s": percentiles([r.ttft for r in ok if r.ttft is not None]),
        "itl_s": percentiles([gap for r in ok for gap in r.itl]),
        "e2e_s": percentiles([r.end - r.start for r in ok]),
    }


def print_table(summary: dict) -> None:
    print(f"requests {summary['requests']} (failed {summary['failed']}) in {summary['wall_s']:.2f} s: "
          f"{summary['requests_per_s']:.2f} req/s, {summary['generated_tokens']} tokens, "
          f"{summary['generated_tokens_per_s']:.1f} generated tokens/s")
    print(f"{'latency (ms)':<14}{'mean':>10}{'p50':>10}{'p90':>10}{'p99':>10}{'max':>10}{'count':>8}")
    for key, label in (("ttft_s", "TTFT"), ("itl_s", "inter-token"), ("e2e_s", "end-to-end")):
        p = summary[key]
        if not p["count"]:
            print(f"{label:<14}{'-':>10}")
            continue
        cells = "".join(f"{p[k] * 1000:>10.1f}" for k in ("mean", "p50", "p90", "p99", "max"))
        print(f"{label:<14}{cells}{p['count']:>8}")
    for error in summary["errors"]:
        print("error:", error)


SCRAPED = (
    "forklm_engine_steps_total", "forklm_step_latency_seconds_sum", "forklm_step_latency_seconds_count",
    "forklm_generation_tokens_total", "forklm_time_to_first_token_seconds_sum",
    "forklm_time_to_first_token_seconds_count", "forklm_requests_finished_total", "forklm_requests_aborted_total",
)


def scrape(url: str) -> dict[str, float]:
    """The server's counters of interest (this run's share is after - before)."""
    text = httpx.get(url + "/metrics", timeout=30).text
    return {line.split(" ")[0]: float(line.split(" ")[1]) for line in text.splitlines() if line.startswith(SCRAPED)}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(args: argparse.Namespace) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [sys.executable, "-m", "forklm", "serve"] + ([args.model] if args.model else [])
    cmd += ["--host", "127.0.0.1", "--port", str(port)] + shlex.split(args.serve_args)
    if args.api_key:
        cmd += ["--api-key", args.api_key]
    print("starting:", shlex.join(cmd), file=sys.stderr)
    proc = subprocess.Popen(cmd)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + args.startup_timeout
    while True:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited with {proc.returncode}")
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            proc.kill()
            raise SystemExit("the server did not come up in time")
        time.sleep(0.3)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--url", help="a running server (default: start one with --start-server)")
    p.add_argument("--start-server", action="store_true", help="start `forklm serve` for the run, stop it after")
    p.add_argument("--model", default=None, help="MODEL for the started server (default: the embedded model)")
    p.add_argument("--serve-args", default="", help="extra arguments for the started server, one string")
    p.add_argument("--api-key", default=None)
    p.add_argument("-R", "--requests", type=int, default=16, help="number of requests (default 16)")
    p.add_argument("-n", type=int, default=4, help="samples per request (default 4)")
    p.add_argument("-c", "--concurrency", type=int, default=4, help="requests in flight at once (default 4)")
    p.add_argument("--max-tokens", type=int, default=32, help="max_tokens per sample (default 32)")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0, help="request i uses seed + i")
    p.add_argument("--ignore-eos", action="store_true", help="every sample generates max_tokens")
    p.add_argument("--timeout", type=float, default=600.0, help="per-request timeout in seconds")
    p.add_argument("--startup-timeout", type=float, default=180.0)
    p.add_argument("--out", default=None, help="JSON file (default benchmarks/results/load_<time>.json)")
    args = p.parse_args(argv)
    if not args.url and not args.start_server:
        p.error("give --url of a running server, or --start-server")

    proc = None
    url = args.url
    if args.start_server:
        proc, url = start_server(args)
    try:
        headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
        model = httpx.get(url + "/v1/models", headers=headers, timeout=30).json()["data"][0]["id"]
        before = scrape(url)
        results, wall = asyncio.run(run_load(url, args, model))
        after = scrape(url)
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(30)

    summary = summarize(results, wall)
    print_table(summary)
    import torch

    record = {
        "command": "python benchmarks/load_test.py " + shlex.join(sys.argv[1:] if argv is None else argv),
        "model": model,
        "settings": {k: v for k, v in vars(args).items() if k not in ("api_key", "out")},
        "host": {"machine": platform.machine(), "cpus": os.cpu_count(), "python": platform.python_version(),
                 "torch": torch.__version__, "cpu_capability": torch.backends.cpu.get_cpu_capability()},
        "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "summary": summary,
        "server_metrics_delta": {k: after[k] - before.get(k, 0.0) for k in after},
    }
    out = Path(args.out) if args.out else RESULTS / f"load_{time.strftime('%Y%m%d_%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {out}")
    return 1 if summary["failed"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
