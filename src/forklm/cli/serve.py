"""`forklm serve`: the OpenAI-compatible HTTP server."""

from __future__ import annotations

import argparse

HELP = "serve an OpenAI-compatible HTTP API (default model: the embedded SmolLM2-135M-Instruct)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", nargs="?", default=None, help="Hugging Face folder, .gguf file or hub id (default: embedded SmolLM2)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)


def run(args: argparse.Namespace) -> int:
    from ..errors import ForklmError

    raise ForklmError("the server is not implemented yet")
