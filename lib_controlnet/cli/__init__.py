"""The command line: `python -m lib_controlnet <command> ...`.

Each command lives in its own module here with `register(subparsers)`, which adds a parser whose
`func(args) -> int` does the work. A UserError or ControlUnitError becomes one line on stderr and exit 2.
A reader that stops early (`| head`) ends the command quietly, as it ends any Unix filter.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys

from lib_controlnet.errors import UserError
from lib_controlnet.unit import ControlUnitError

COMMAND_MODULES = ("models", "detect", "generate", "serve", "dataset", "train", "demo", "evaluate")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m lib_controlnet", description="ControlNet Studio")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(f"lib_controlnet.cli.{name}").register(subparsers)
    return parser


# What a shell reports for a filter killed by SIGPIPE (128 + 13). Python ignores SIGPIPE, so the same end comes
# here as a BrokenPipeError; restoring SIG_DFL instead would also kill `serve` when an HTTP client hangs up.
BROKEN_PIPE_EXIT = 141


def main(argv: list[str] | None = None) -> int:
    try:
        code = _run(argv)
        sys.stdout.flush()  # inside the try: a pipe closed by the reader fails here, not at interpreter exit
        return code
    except BrokenPipeError:
        # Point stdout at /dev/null so the interpreter's own final flush has nowhere to fail.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return BROKEN_PIPE_EXIT


def _run(argv: list[str] | None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except (UserError, ControlUnitError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
