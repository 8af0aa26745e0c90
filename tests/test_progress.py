"""Progress: a bar (requests, tokens/s) and load / compile lines on a terminal's stderr; nothing on a
pipe, nothing in --json mode, and stdout holds only the result."""

from __future__ import annotations

import fcntl
import json
import os
import pty
import struct
import subprocess
import sys
import termios
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent / "server"))
from server_fixtures import make_tiny_model  # noqa: E402

from forklm import LLM, SamplingParams  # noqa: E402


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("progress_model"))


def _run_with_tty_stderr(*args: str) -> tuple[int, str, str]:
    """`forklm ARGS` with stderr on a pseudo-terminal, stdout on a pipe: (code, stdout, terminal text)."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))  # 40 rows, 120 columns
    env = dict(os.environ, OMP_NUM_THREADS="2")
    proc = subprocess.Popen([sys.executable, "-m", "forklm", *args], stdout=subprocess.PIPE, stderr=slave, env=env)
    os.close(slave)
    terminal = b""
    while True:
        try:
            chunk = os.read(master, 4096)
        except OSError:  # the child closed the terminal
            break
        if not chunk:
            break
        terminal += chunk
    os.close(master)
    stdout = proc.stdout.read().decode()
    return proc.wait(timeout=120), stdout, terminal.decode(errors="replace")


def test_cli_shows_progress_on_a_terminal(model_dir):
    code, stdout, terminal = _run_with_tty_stderr("generate", str(model_dir), "--prompt", "hello", "-n", "3",
                                                  "--max-tokens", "5", "--seed", "1")
    assert code == 0, terminal
    assert "forklm: loading" in terminal and "forklm: loaded in" in terminal
    assert "generating" in terminal and "tok/s" in terminal and "1/1" in terminal
    assert stdout.count("--- sample") == 3 and "tok/s" not in stdout


def test_cli_json_mode_prints_no_progress(model_dir):
    code, stdout, terminal = _run_with_tty_stderr("generate", str(model_dir), "--prompt", "hello", "-n", "2",
                                                  "--max-tokens", "5", "--json")
    assert code == 0, terminal
    assert "generating" not in terminal and "loading" not in terminal
    assert len(json.loads(stdout)["samples"]) == 2


def test_llm_progress_only_on_a_terminal(model_dir, capfd):
    llm = LLM(model_dir)
    out = llm.generate(["hi", "there"], SamplingParams(max_tokens=3), use_tqdm=True)  # stderr is captured: a pipe
    assert len(out) == 2
    captured = capfd.readouterr()
    assert captured.err == "" and captured.out == ""


def test_llm_progress_counts_requests_and_tokens(model_dir, monkeypatch):
    """The bar itself, on a stream that says it is a terminal."""
    import io

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    term = Terminal()
    monkeypatch.setattr(sys, "stderr", term)
    llm = LLM(model_dir)
    llm.generate(["hi", "there", "you"], SamplingParams(n=2, max_tokens=4, ignore_eos=True))
    text = term.getvalue()
    assert "3/3" in text and "24 tokens" in text, text
    term.truncate(0)
    llm.generate(["hi"], SamplingParams(max_tokens=2), use_tqdm=False)
    assert term.getvalue().strip("\x00") == ""
