"""The command line: `python -m lib_controlnet <command> ...`.

Each command lives in its own module here with `register(subparsers)`, which adds a parser whose
`func(args) -> int` does the work. A UserError or ControlUnitError becomes one line on stderr and exit 2.
"""
from __future__ import annotations

import argparse
import importlib
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


def main(argv: list[str] | None = None) -> int:
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
