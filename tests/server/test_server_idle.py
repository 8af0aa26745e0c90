"""An idle server costs (almost) nothing: after requests, a streamed one cut by its client and a
burst, the process uses a small fraction of one core while nobody asks anything (a busy-waiting
loop or spinning threads would use a whole one). The figure itself is a benchmark's
(benchmarks/load_test.py --storm); this bound only catches a spin."""

from __future__ import annotations

import os
import time

import httpx
from server_fixtures import ServerProcess, make_tiny_model


def _cpu_seconds(pid: int) -> float:
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime, all threads


def test_idle_server_uses_almost_no_cpu(tmp_path):
    srv = ServerProcess(make_tiny_model(tmp_path / "m"), "--max-batch", "8", "--max-prompts", "4",
                        "--max-prompt-len", "32", "--max-tokens", "64")
    try:
        for n in (1, 4, 8):
            assert httpx.post(srv.url + "/v1/completions", json={"prompt": "hello", "max_tokens": 16, "n": n},
                              timeout=60).status_code == 200
        with httpx.stream("POST", srv.url + "/v1/completions", timeout=60,
                          json={"prompt": "hi", "max_tokens": 64, "ignore_eos": True, "stream": True}) as r:
            for i, _ in enumerate(r.iter_lines()):
                if i == 4:
                    break  # the client goes away mid-stream
        time.sleep(1.0)  # let the abort land and the threads settle
        start_cpu, start = _cpu_seconds(srv.proc.pid), time.monotonic()
        time.sleep(3.0)
        busy = (_cpu_seconds(srv.proc.pid) - start_cpu) / (time.monotonic() - start)
        assert busy < 0.2, f"idle server used {busy:.2f} of a core"
        assert httpx.get(srv.url + "/health", timeout=10).status_code == 200
    finally:
        srv.stop()
