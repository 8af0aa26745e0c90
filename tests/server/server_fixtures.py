"""Helpers of the server tests: a tiny model with a character-level tokenizer, a server process.

The tokenizer maps every character to one token (5 special tokens, then printable ASCII, newline
and Latin letters up to the models' vocab_size of 211), so text length counts tokens and every
token id decodes to a distinct string.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

from conftest import make_hf_model  # tests/conftest.py (pytest puts tests/ on sys.path)

VOCAB_SIZE = 211
SPECIAL = ["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
# written like SmolLM2's: string concatenation, so a null content fails inside the template
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def char_vocab() -> dict[str, int]:
    chars = [chr(c) for c in range(32, 127)] + ["\n"]
    chars += [chr(c) for c in range(0xC0, 0xC0 + VOCAB_SIZE - len(SPECIAL) - len(chars))]
    vocab = {t: i for i, t in enumerate(SPECIAL + chars)}
    assert len(vocab) == VOCAB_SIZE
    return vocab


def make_tiny_model(folder: Path, family: str = "llama_mha", chat_template: bool = True) -> Path:
    """A tiny random model of `family` with a character-level tokenizer, saved to `folder`."""
    from tokenizers import AddedToken, Tokenizer, decoders, models

    make_hf_model(family).save_pretrained(folder)
    tok = Tokenizer(models.BPE(vocab=char_vocab(), merges=[], unk_token="<unk>"))
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL])
    tok.save(str(folder / "tokenizer.json"))
    config = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "add_bos_token": False}
    if chat_template:
        config["chat_template"] = CHAT_TEMPLATE
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """`python -m forklm serve ...` on a free 127.0.0.1 port, up once /health answers."""

    def __init__(self, model: str | None, *args: str, startup_timeout: float = 90.0):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "forklm", "serve"] + ([str(model)] if model else [])
        cmd += ["--host", "127.0.0.1", "--port", str(self.port), *args]
        env = dict(os.environ)
        env.pop("FORKLM_API_KEY", None)
        env.setdefault("OMP_NUM_THREADS", "2")
        self.log = open(Path(os.environ.get("TMPDIR", "/tmp")) / f"forklm-serve-{self.port}.log", "w+")
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + startup_timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.output()}")
            try:
                if httpx.get(self.url + "/health", timeout=1.0).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"server did not come up in {startup_timeout} s:\n{self.output()}")
            time.sleep(0.2)

    def output(self) -> str:
        self.log.flush()
        self.log.seek(0)
        return self.log.read()

    def metrics(self) -> dict[str, float]:
        """/metrics as {sample name with labels: value}."""
        text = httpx.get(self.url + "/metrics", timeout=10).text
        out = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                name, value = line.rsplit(" ", 1)
                out[name] = float(value)
        return out

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.log.close()


def assert_error(response: httpx.Response, status: int, param: str | None = None) -> dict:
    """`response` is OpenAI's error JSON with `status` (and names `param` when given)."""
    assert response.status_code == status, (response.status_code, response.text)
    body = response.json()
    assert set(body) == {"error"}, body
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert isinstance(error["message"], str) and error["message"], error
    assert isinstance(error["type"], str) and error["type"], error
    if param is not None:
        assert error["param"] == param, error
    return error
