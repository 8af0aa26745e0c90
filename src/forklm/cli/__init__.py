"""`forklm` command line: one module per subcommand, each with `add_arguments` and `run`."""

from __future__ import annotations

import argparse
import logging
import sys

from ..errors import ForklmError
from . import generate, serve

SUBCOMMANDS = {"generate": generate, "serve": serve}


class _Parser(argparse.ArgumentParser):
    """Bad arguments: one line on stderr, exit code 2, no usage dump, no traceback."""

    def error(self, message: str):
        sys.stderr.write(f"{self.prog}: error: {message}\n")
        raise SystemExit(2)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="forklm",
        description="forklm: fast parallel sampling (many samples from one prompt) for Hugging Face and GGUF models.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress to stderr")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for name, module in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=module.HELP, description=module.HELP)
        p.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                       help="log progress to stderr (before or after the subcommand)")
        module.add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(name)s: %(message)s")
    try:
        return SUBCOMMANDS[args.command].run(args) or 0
    except ForklmError as e:
        sys.stderr.write(f"forklm {args.command}: error: {e}\n")
        return 2
    except KeyboardInterrupt:
        return 130
