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


def test_cli_stream_prints_sample_zero_as_it_comes(model_dir):
    code, stdout, terminal = _run_with_tty_stderr("generate", str(model_dir), "--prompt", "hello", "-n", "2",
                                                  "--max-tokens", "6", "--seed", "3", "--stream")
    assert code == 0, terminal
    code2, plain, _ = _run_with_tty_stderr("generate", str(model_dir), "--prompt", "hello", "-n", "2",
                                           "--max-tokens", "6", "--seed", "3")
    assert stdout.startswith("--- sample 0 (streaming) ---\n") and "--- sample 1 (" in stdout
    streamed = stdout.split("--- sample 0 (streaming) ---\n")[1].split("\n--- sample 0 (")[0]
    whole = plain.split("--- sample 0 (")[1].split("\n", 1)[1].split("\n--- sample 1")[0]
    assert streamed == whole  # the same text, streamed


def test_cli_stream_and_json_together_is_one_line_error(model_dir):
    r = subprocess.run([sys.executable, "-m", "forklm", "generate", str(model_dir), "--prompt", "x", "--stream",
                        "--json"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and "--stream" in r.stderr


def test_llm_stream_yields_the_same_tokens_as_generate(model_dir):
    llm = LLM(model_dir)
    params = SamplingParams(n=3, max_tokens=7, seed=11, temperature=0.9)
    want = llm.generate(["abc", "xyz"], params)
    got: dict = {}
    for prompt, delta in llm.stream(["abc", "xyz"], params):
        got.setdefault((prompt, delta.index), []).extend(delta.token_ids)
    assert got == {(p, o.index): o.token_ids for p, r in enumerate(want) for o in r.outputs}
    # stopping early leaves the engine empty for the next call
    for _ in llm.stream(["abc"], SamplingParams(max_tokens=50, ignore_eos=True)):
        break
    assert not llm._engine.has_unfinished()
    assert llm.generate(["abc", "xyz"], params)[1].outputs[2].token_ids == want[1].outputs[2].token_ids


def test_a_second_call_while_a_stream_runs_is_a_busy_error(model_dir):
    from forklm.errors import BusyError

    llm = LLM(model_dir)
    stream = llm.stream(["abc"], SamplingParams(max_tokens=20, ignore_eos=True))
    next(stream)
    with pytest.raises(BusyError):
        llm.generate(["xyz"], SamplingParams(max_tokens=2))
    with pytest.raises(BusyError):
        next(llm.stream(["xyz"], SamplingParams(max_tokens=2)))
    stream.close()  # closing frees the engine
    assert len(llm.generate(["xyz"], SamplingParams(max_tokens=2))[0].outputs[0].token_ids) == 2
