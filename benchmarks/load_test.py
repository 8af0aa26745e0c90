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

`--storm` fires `--storm-clients` (200) streamed requests all at once instead: mixed n
(`--storm-n`, 1..4), mixed max_tokens (`--storm-tokens`, 8..48), distinct seeds, ignore_eos, and
a fraction (`--disconnect-fraction`, 1/3) of the clients close their stream after k tokens. It
reports requests/s, tokens/s, TTFT and inter-token percentiles, completed / refused (429, with or
without Retry-After) / disconnected / failed counts, whether every completed stream got all its
n x max_tokens tokens and a usage.completion_tokens equal to the tokens counted, the server's RSS
(with --start-server) before, right after and `--settle` (5) s after the storm, whether /metrics
forklm_requests_running and forklm_requests_waiting return to 0, and whether a seeded request
(temperature 0.8, seed 123) gives the same text before and after. Writes
benchmarks/results/storm_<tag>.json and .md; exits 1 when a check fails.

    python benchmarks/load_test.py --start-server --storm --tag smollm2_c200 \\
        --serve-args "--max-batch 64 --max-prompts 64 --max-queue 256 --max-tokens 64"
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
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


def scrape(url: str, names: tuple[str, ...] = SCRAPED) -> dict[str, float]:
    """The server's counters of interest (this run's share is after - before)."""
    text = httpx.get(url + "/metrics", timeout=30).text
    return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
            if line.startswith(names)}


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


# ---- --storm -------------------------------------------------------------------------------------
SEEDED = {"prompt": "Once upon a time", "n": 2, "max_tokens": 24, "temperature": 0.8, "seed": 123,
          "ignore_eos": True}
GAUGES = ("forklm_requests_running", "forklm_requests_waiting", "forklm_sample_rows_in_use")


@dataclass
class StormClient:
    index: int
    n: int
    max_tokens: int
    seed: int
    disconnect_after: int | None  # close the stream once this many tokens came (None: read it all)
    start: float = 0.0
    end: float | None = None
    status: int | None = None
    retry_after: str | None = None
    ttft: float | None = None
    itl: list[float] = field(default_factory=list)
    per_choice: dict[int, int] = field(default_factory=dict)  # tokens counted per choice index
    finish: dict[int, str] = field(default_factory=dict)
    usage_tokens: int | None = None
    done: bool = False  # saw data: [DONE]
    disconnected: bool = False
    error: str | None = None

    @property
    def tokens(self) -> int:
        return sum(self.per_choice.values())

    @property
    def outcome(self) -> str:
        if self.error is not None:
            return "failed"
        if self.status == 429:
            return "refused"
        return "disconnected" if self.disconnected else "completed"

    @property
    def all_tokens(self) -> bool:
        """Every choice ran to max_tokens (ignore_eos), finished with "length", and [DONE] came."""
        return (self.done and self.tokens == self.n * self.max_tokens
                and all(self.per_choice.get(i) == self.max_tokens for i in range(self.n))
                and all(self.finish.get(i) == "length" for i in range(self.n)))


async def storm_request(client: httpx.AsyncClient, body: dict, c: StormClient) -> None:
    last: dict[int, float] = {}
    c.start = time.perf_counter()
    try:
        async with client.stream("POST", "/v1/completions", json=body) as r:
            c.status = r.status_code
            if r.status_code != 200:
                c.retry_after = r.headers.get("retry-after")
                text = (await r.aread()).decode(errors="replace")[:300]
                if r.status_code != 429:
                    c.error = f"{r.status_code}: {text}"
                return
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    c.done = True
                    break
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    c.error = f"in stream: {chunk['error'].get('message')}"[:300]
                    continue
                if chunk.get("usage"):
                    c.usage_tokens = chunk["usage"]["completion_tokens"]
                now = time.perf_counter()
                for choice in chunk["choices"]:
                    index = choice["index"]
                    if choice.get("finish_reason"):
                        c.finish[index] = choice["finish_reason"]
                    count = len((choice.get("logprobs") or {}).get("tokens") or [])
                    if not count:
                        continue
                    c.per_choice[index] = c.per_choice.get(index, 0) + count
                    if c.ttft is None:
                        c.ttft = now - c.start
                    if index in last:
                        c.itl.append(now - last[index])
                    last[index] = now
                if c.disconnect_after is not None and c.tokens >= c.disconnect_after:
                    c.disconnected = True
                    break  # leaving `async with` closes the half-read response: the connection drops
    except httpx.HTTPError as error:
        c.error = f"{type(error).__name__}: {error}"[:300]
    finally:
        c.end = time.perf_counter()


def storm_clients(args: argparse.Namespace) -> list[StormClient]:
    rng = random.Random(args.seed)
    count = args.storm_clients
    leaving = set(rng.sample(range(count), round(count * args.disconnect_fraction)))
    clients = []
    for i in range(count):
        n = rng.randint(*args.storm_n)
        max_tokens = rng.randint(*args.storm_tokens)
        k = rng.randint(1, max(1, n * max_tokens // 2)) if i in leaving else None
        clients.append(StormClient(i, n, max_tokens, args.seed + i, k))
    return clients


async def get_gauges(http: httpx.AsyncClient) -> dict[str, float]:
    text = (await http.get("/metrics")).text
    return {line.split(" ")[0]: float(line.split(" ")[1]) for line in text.splitlines()
            if line.split(" ")[0] in GAUGES}


async def watch_gauges(http: httpx.AsyncClient, stop: asyncio.Event, peak: dict[str, float]) -> None:
    while not stop.is_set():
        try:
            for k, v in (await get_gauges(http)).items():
                peak[k] = max(peak.get(k, 0.0), v)
        except httpx.HTTPError:
            pass
        try:
            await asyncio.wait_for(stop.wait(), 0.5)
        except asyncio.TimeoutError:
            pass


def read_rss(pid: int | None) -> dict | None:
    """VmRSS and VmHWM (peak) of `pid` in MiB, from /proc/<pid>/status (None without a pid)."""
    if pid is None:
        return None
    try:
        lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    except OSError:
        return None
    out = {}
    for line in lines:
        key = line.split(":")[0]
        if key in ("VmRSS", "VmHWM"):
            out[key + "_mib"] = int(line.split()[1]) / 1024
    return out


async def run_storm(url: str, args: argparse.Namespace, model: str, pid: int | None) -> dict:
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    clients = storm_clients(args)
    limits = httpx.Limits(max_connections=len(clients) + 8, max_keepalive_connections=len(clients) + 8)
    seeded_body = {"model": model, **SEEDED}
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=args.timeout) as http:

        async def seeded() -> list[str]:
            r = await http.post("/v1/completions", json=seeded_body)
            r.raise_for_status()
            return [c["text"] for c in sorted(r.json()["choices"], key=lambda c: c["index"])]

        seeded_before = await seeded()
        gauges_before = await get_gauges(http)
        rss_before = read_rss(pid)
        load_before = os.getloadavg()
        metrics_before = scrape(url)

        peak: dict[str, float] = {}
        stop = asyncio.Event()
        watcher = asyncio.create_task(watch_gauges(http, stop, peak))
        async with httpx.AsyncClient(base_url=url, headers=headers, timeout=args.timeout, limits=limits) as client:

            async def one(c: StormClient) -> None:
                body = {"model": model, "prompt": PROMPTS[c.index % len(PROMPTS)], "n": c.n,
                        "max_tokens": c.max_tokens, "temperature": args.temperature, "seed": c.seed,
                        "stream": True, "stream_options": {"include_usage": True}, "logprobs": 0,
                        "ignore_eos": True}
                await storm_request(client, body, c)

            t0 = time.perf_counter()
            await asyncio.gather(*(one(c) for c in clients))
            wall = time.perf_counter() - t0
        storm_end = time.monotonic()
        stop.set()
        await watcher
        rss_after = read_rss(pid)
        load_after_storm = os.getloadavg()

        # the gauges must drain to 0 (aborts of the disconnected clients included)
        polls = []
        zero_after = None
        while time.monotonic() - storm_end < args.zero_timeout:
            g = await get_gauges(http)
            polls.append({"t_s": round(time.monotonic() - storm_end, 3), **g})
            if g.get("forklm_requests_running") == 0 and g.get("forklm_requests_waiting") == 0:
                zero_after = time.monotonic() - storm_end
                break
            await asyncio.sleep(0.2)
        await asyncio.sleep(max(0.0, storm_end + args.settle - time.monotonic()))
        rss_settled = read_rss(pid)
        idle_cpu = await idle_cpu_share(pid, args.idle_seconds)
        seeded_after = await seeded()
        health = (await http.get("/health")).status_code
        metrics_after = scrape(url, STORM_SCRAPED)
        load_after = os.getloadavg()
    return {
        "clients": clients, "wall": wall, "seeded_before": seeded_before, "seeded_after": seeded_after,
        "gauges_before": gauges_before, "gauges_peak": peak, "gauge_polls": polls, "zero_after_s": zero_after,
        "rss": {"before": rss_before, "after": rss_after, f"after_{args.settle:g}s_settle": rss_settled},
        "loadavg": {"before": load_before, "after_storm": load_after_storm, "after": load_after},
        "metrics_delta": {k: v - metrics_before.get(k, 0.0) for k, v in metrics_after.items()},
        "health_after": health, "idle_cpu_share": idle_cpu,
    }


def cpu_seconds(pid: int) -> float:
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime, all threads


async def idle_cpu_share(pid: int | None, seconds: float) -> float | None:
    """The share of one core the server uses while nobody asks anything, after the storm."""
    if pid is None or seconds <= 0:
        return None
    start_cpu, start = cpu_seconds(pid), time.monotonic()
    await asyncio.sleep(seconds)
    return (cpu_seconds(pid) - start_cpu) / (time.monotonic() - start)


STORM_SCRAPED = SCRAPED + ("forklm_requests_submitted_total", "forklm_requests_rejected_total",
                           "forklm_prompt_tokens_total", "forklm_prefix_cache_hit_tokens_total")


def summarize_storm(run: dict, args: argparse.Namespace) -> dict:
    clients: list[StormClient] = run["clients"]
    wall = run["wall"]
    by = {k: [c for c in clients if c.outcome == k] for k in ("completed", "refused", "disconnected", "failed")}
    done = by["completed"]
    accepted = [c for c in clients if c.status == 200 and c.error is None]
    incomplete = [c.index for c in done if not c.all_tokens]
    usage_bad = [c.index for c in done if c.usage_tokens != c.tokens]
    received = sum(c.tokens for c in clients)
    generated = run["metrics_delta"].get("forklm_generation_tokens_total")
    statuses: dict[str, int] = {}
    for c in clients:
        statuses[str(c.status)] = statuses.get(str(c.status), 0) + 1
    checks = {
        "every_status_200_or_429": all(c.status in (200, 429) for c in clients),
        "every_429_has_retry_after": all(c.retry_after for c in by["refused"]),
        "no_failed_streams": not by["failed"],
        "every_completed_stream_got_all_tokens": not incomplete,
        "every_completed_usage_matches_tokens": not usage_bad,
        "gauges_back_to_0": run["zero_after_s"] is not None,
        "seeded_identical": run["seeded_before"] == run["seeded_after"],
        "healthy_after": run["health_after"] == 200,
    }
    return {
        "clients": len(clients),
        "completed": len(done),
        "refused_429": len(by["refused"]),
        "refused_with_retry_after": sum(1 for c in by["refused"] if c.retry_after),
        "retry_after_values": sorted({c.retry_after for c in by["refused"] if c.retry_after}),
        "disconnected": len(by["disconnected"]),
        "disconnect_planned": sum(1 for c in clients if c.disconnect_after is not None),
        "failed": len(by["failed"]),
        "errors": sorted({c.error for c in by["failed"]})[:5],
        "statuses": statuses,
        "wall_s": wall,
        "requests_per_s": len(done) / wall,
        "accepted_requests_per_s": len(accepted) / wall,
        "received_tokens": received,
        "received_tokens_per_s": received / wall,
        "completed_tokens": sum(c.tokens for c in done),
        "server_generated_tokens": generated,
        "server_generated_tokens_per_s": generated / wall if generated is not None else None,
        "ttft_s": percentiles([c.ttft for c in accepted if c.ttft is not None]),
        "itl_s": percentiles([gap for c in accepted for gap in c.itl]),
        "e2e_completed_s": percentiles([c.end - c.start for c in done]),
        "refusal_s": percentiles([c.end - c.start for c in by["refused"]]),
        "completed_all_tokens": len(done) - len(incomplete),
        "completed_incomplete_indices": incomplete[:20],
        "completed_usage_matches": len(done) - len(usage_bad),
        "completed_usage_mismatch_indices": usage_bad[:20],
        "gauges_peak_during_storm": run["gauges_peak"],
        "gauges_zero_after_s": run["zero_after_s"],
        "gauges_last_poll": run["gauge_polls"][-1] if run["gauge_polls"] else None,
        "rss_mib": run["rss"],
        "seeded_request": {**SEEDED, "before": run["seeded_before"], "after": run["seeded_after"],
                           "identical": run["seeded_before"] == run["seeded_after"]},
        "health_after": run["health_after"],
        "idle_cpu_share_of_one_core": run["idle_cpu_share"],
        "loadavg": run["loadavg"],
        "checks": checks,
        "ok": all(checks.values()),
    }


def storm_rows(s: dict) -> list[tuple[str, str]]:
    def lat(key: str) -> str:
        p = s[key]
        if not p["count"]:
            return "-"
        return " / ".join(f"{p[k] * 1000:.0f}" for k in ("p50", "p90", "p99")) + f" (n={p['count']})"

    def rss(key: str) -> str:
        r = s["rss_mib"].get(key)
        return f"{r['VmRSS_mib']:.0f} (peak {r['VmHWM_mib']:.0f})" if r else "-"

    load = s["loadavg"]
    zero = s["gauges_zero_after_s"]
    return [
        ("clients (all at once)", f"{s['clients']}"),
        ("completed / refused 429 / disconnected / failed",
         f"{s['completed']} / {s['refused_429']} / {s['disconnected']} / {s['failed']}"),
        ("429 with Retry-After", f"{s['refused_with_retry_after']} of {s['refused_429']} {s['retry_after_values']}"),
        ("wall (s)", f"{s['wall_s']:.1f}"),
        ("completed requests/s", f"{s['requests_per_s']:.2f}"),
        ("tokens/s received (server generated)",
         f"{s['received_tokens_per_s']:.1f} ({s['server_generated_tokens_per_s'] or 0:.1f})"),
        ("TTFT p50 / p90 / p99 (ms)", lat("ttft_s")),
        ("inter-token p50 / p90 / p99 (ms)", lat("itl_s")),
        ("end-to-end completed p50 / p90 / p99 (ms)", lat("e2e_completed_s")),
        ("completed with all n x max_tokens tokens", f"{s['completed_all_tokens']} of {s['completed']}"),
        ("completed with usage == tokens counted", f"{s['completed_usage_matches']} of {s['completed']}"),
        ("peak running / waiting / rows in use",
         " / ".join(f"{s['gauges_peak_during_storm'].get(k, 0):.0f}" for k in GAUGES)),
        ("running = waiting = 0 after the storm", f"after {zero:.2f} s" if zero is not None else "NO"),
        ("server RSS MiB before", rss("before")),
        ("server RSS MiB right after", rss("after")),
        ("server RSS MiB after settle", rss(next(k for k in s["rss_mib"] if k.endswith("settle")))),
        ("idle CPU after, share of one core", "-" if s["idle_cpu_share_of_one_core"] is None
         else f"{s['idle_cpu_share_of_one_core']:.4f}"),
        ("seeded request identical before / after", "yes" if s["seeded_request"]["identical"] else "NO"),
        ("/health after", str(s["health_after"])),
        ("load average before / after (1, 5, 15 min)",
         f"{' '.join(f'{x:.2f}' for x in load['before'])} / {' '.join(f'{x:.2f}' for x in load['after'])}"),
        ("all checks", "pass" if s["ok"] else "FAIL: " + ", ".join(k for k, v in s["checks"].items() if not v)),
    ]


def connect(args: argparse.Namespace):
    """(server process or None, URL, model id): the server started here when asked, else args.url."""
    proc, url = start_server(args) if args.start_server else (None, args.url)
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    try:
        model = httpx.get(url + "/v1/models", headers=headers, timeout=30).json()["data"][0]["id"]
    except BaseException:
        if proc is not None:
            proc.terminate()
        raise
    return proc, url, model


def storm_main(args: argparse.Namespace, argv: list[str] | None) -> int:
    proc, url, model = connect(args)
    try:
        run = asyncio.run(run_storm(url, args, model, proc.pid if proc is not None else None))
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(30)

    summary = summarize_storm(run, args)
    rows = storm_rows(summary)
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
    for error in summary["errors"]:
        print("error:", error)
    import torch

    command = "python benchmarks/load_test.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    record = {
        "command": command,
        "model": model,
        "settings": {k: v for k, v in vars(args).items() if k not in ("api_key", "out")},
        "host": {"machine": platform.machine(), "cpus": os.cpu_count(), "python": platform.python_version(),
                 "torch": torch.__version__, "cpu_capability": torch.backends.cpu.get_cpu_capability()},
        "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "loadavg": summary["loadavg"],
        "summary": summary,
        "server_metrics_delta": run["metrics_delta"],
        "gauge_polls_after_storm": run["gauge_polls"],
        "clients": [{"index": c.index, "n": c.n, "max_tokens": c.max_tokens, "seed": c.seed,
                     "disconnect_after": c.disconnect_after, "status": c.status, "outcome": c.outcome,
                     "retry_after": c.retry_after, "tokens": c.tokens, "usage_tokens": c.usage_tokens,
                     "all_tokens": c.all_tokens, "ttft_s": c.ttft,
                     "e2e_s": (c.end - c.start) if c.end is not None else None, "error": c.error}
                    for c in run["clients"]],
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"storm_{args.tag}.json"
    out.write_text(json.dumps(record, indent=2) + "\n")
    md = [f"# Storm: {summary['clients']} concurrent streams ({args.tag})", "", "```", command, "```", "",
          f"Model `{model}`; {record['host']['cpus']} CPUs, torch {record['host']['torch']}; {record['when']}.",
          f"n in {args.storm_n[0]}..{args.storm_n[1]}, max_tokens in {args.storm_tokens[0]}..{args.storm_tokens[1]}, "
          f"ignore_eos, temperature {args.temperature}, seeds {args.seed}..{args.seed + summary['clients'] - 1}, "
          f"{summary['disconnect_planned']} clients close their stream after k tokens.", "",
          "| figure | value |", "| --- | ---: |"]
    md += [f"| {k} | {v} |" for k, v in rows]
    (RESULTS / f"storm_{args.tag}.md").write_text("\n".join(md) + "\n")
    print(f"wrote {out} and {out.with_suffix('.md')}")
    return 0 if summary["ok"] else 1


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
    storm = p.add_argument_group("storm mode (--storm: -R, -n, -c, --max-tokens and --ignore-eos do not apply)")
    storm.add_argument("--storm", action="store_true", help="all clients at once, some disconnecting mid-stream")
    storm.add_argument("--storm-clients", type=int, default=200, help="concurrent streamed requests (default 200)")
    storm.add_argument("--storm-n", type=int, nargs=2, default=[1, 4], metavar=("LO", "HI"),
                       help="n of each request drawn from LO..HI (default 1 4)")
    storm.add_argument("--storm-tokens", type=int, nargs=2, default=[8, 48], metavar=("LO", "HI"),
                       help="max_tokens of each request drawn from LO..HI (default 8 48)")
    storm.add_argument("--disconnect-fraction", type=float, default=1 / 3,
                       help="clients that close their stream after k tokens, k in 1..n*max_tokens/2 (default 1/3)")
    storm.add_argument("--settle", type=float, default=5.0, help="seconds after the storm of the last RSS reading")
    storm.add_argument("--idle-seconds", type=float, default=10.0,
                       help="seconds over which the idle server's CPU use is measured after the storm (default 10)")
    storm.add_argument("--zero-timeout", type=float, default=30.0,
                       help="seconds the running/waiting gauges may take to return to 0")
    storm.add_argument("--tag", default=None, help="results go to storm_<tag>.json/.md (default: the time)")
    args = p.parse_args(argv)
    if not args.url and not args.start_server:
        p.error("give --url of a running server, or --start-server")
    if args.storm:
        if args.tag is None:
            args.tag = time.strftime("%Y%m%d_%H%M%S")
        return storm_main(args, argv)

    proc, url, model = connect(args)
    try:
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
