"""The serving process: engine loop on the main thread, HTTP beside it; SIGTERM mid-stream and a
port already in use end it cleanly."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading

import httpx
from server_fixtures import ServerProcess, make_tiny_model


def _stream_and_signal(srv: ServerProcess, signals: int, max_tokens: int = 200, probe: bool = False) -> dict:
    """Stream one request; after its third line, send SIGTERM `signals` times; wait for the process."""
    got: dict = {}

    def stream():
        body = {"prompt": "hello", "max_tokens": max_tokens, "ignore_eos": True, "stream": True,
                "stream_options": {"include_usage": True}}
        lines = []
        try:
            with httpx.stream("POST", srv.url + "/v1/completions", json=body, timeout=60) as r:
                got["status"] = r.status_code
                for line in r.iter_lines():
                    lines.append(line)
                    if len(lines) == 3:
                        for i in range(signals):
                            srv.proc.send_signal(signal.SIGTERM)
                            # signals that arrive together are handled once: wait until this one was
                            while i + 1 < signals and httpx.get(srv.url + "/health", timeout=10).status_code == 200:
                                pass
                        got["after_signal"] = httpx.post(srv.url + "/v1/completions", timeout=10,
                                                         json={"prompt": "x", "max_tokens": 2}) if probe else None
                        got["health"] = httpx.get(srv.url + "/health", timeout=10) if probe else None
        except httpx.HTTPError as e:  # the connection closed under the stream
            got["error"] = type(e).__name__
        got["lines"] = lines

    assert httpx.get(srv.url + "/v1/models", timeout=10).json()["data"]
    t = threading.Thread(target=stream)
    t.start()
    t.join(60)
    got["code"] = srv.proc.wait(30)
    return got


def test_sigterm_lets_running_streams_finish_and_refuses_new_requests(tmp_path):
    srv = ServerProcess(make_tiny_model(tmp_path / "m"), "--max-batch", "2", "--max-prompts", "1",
                        "--max-prompt-len", "32", "--max-tokens", "200", "--shutdown-grace", "30")
    got = _stream_and_signal(srv, signals=1, max_tokens=120, probe=True)
    assert got["code"] == 0 and got["status"] == 200, got
    data = [line for line in got["lines"] if line.startswith("data: ")]
    assert data[-1] == "data: [DONE]" and '"finish_reason":"length"' in data[-3].replace(" ", ""), data[-3:]
    usage = json.loads(data[-2][len("data: "):])["usage"]
    assert usage["completion_tokens"] == 120  # every token
    refused = got["after_signal"]
    assert refused.status_code == 503 and refused.json()["error"]["code"] == "shutting_down", refused.text
    assert got["health"].status_code == 503
    assert "Traceback" not in srv.output()
    srv.stop()


def test_a_second_sigterm_ends_the_streams_at_once(tmp_path):
    srv = ServerProcess(make_tiny_model(tmp_path / "m"), "--max-batch", "2", "--max-prompts", "1",
                        "--max-prompt-len", "32", "--max-tokens", "250", "--shutdown-grace", "600")
    got = _stream_and_signal(srv, signals=2, max_tokens=250)
    assert got["code"] == 0 and got["status"] == 200, got
    data = [line for line in got["lines"] if line.startswith("data: ")]
    assert data[-1] == "data: [DONE]" and "engine_stopped" in data[-2], data[-3:]
    srv.stop()


def test_sigterm_mid_stream_ends_the_stream_and_the_process(tmp_path):
    srv = ServerProcess(make_tiny_model(tmp_path / "m"), "--max-batch", "2", "--max-prompts", "1",
                        "--max-prompt-len", "32", "--max-tokens", "200", "--shutdown-grace", "0")
    got = _stream_and_signal(srv, signals=1)
    assert got["code"] == 0
    assert got["status"] == 200 and len(got["lines"]) >= 3
    data = [line for line in got["lines"] if line.startswith("data: ")]
    assert data[-1] == "data: [DONE]", got  # ended cleanly, not cut mid-air
    assert "engine_stopped" in data[-2], data[-2]  # the error event says why
    assert "Traceback" not in srv.output()
    srv.stop()


def test_a_port_in_use_exits_nonzero_with_one_line(tmp_path):
    folder = make_tiny_model(tmp_path / "m")
    srv = ServerProcess(folder, "--max-batch", "2", "--max-prompts", "1", "--max-prompt-len", "32")
    try:
        p = subprocess.run([sys.executable, "-m", "forklm", "serve", str(folder), "--host", "127.0.0.1", "--port",
                            str(srv.port), "--max-batch", "2", "--max-prompts", "1", "--max-prompt-len", "32"],
                           capture_output=True, text=True, timeout=120)
        assert p.returncode != 0
        assert "Traceback" not in p.stderr
        assert "forklm serve: error: the HTTP server could not start on 127.0.0.1:" in p.stderr
        assert httpx.get(srv.url + "/health", timeout=10).status_code == 200  # the first one serves on
    finally:
        srv.stop()


def test_a_port_out_of_range_is_one_line(tmp_path):
    for port in ("70000", "-1"):
        p = subprocess.run([sys.executable, "-m", "forklm", "serve", str(tmp_path), "--port", port],
                           capture_output=True, text=True, timeout=60)
        assert p.returncode == 2 and "Traceback" not in p.stderr
        assert p.stderr.strip() == f"forklm serve: error: --port: must be in [0, 65535], got {port}", p.stderr
