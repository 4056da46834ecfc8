"""What every CLI command shares: its --help describes every flag with its default, and a reader that stops
early (`| head`) ends the command quietly."""
from __future__ import annotations

import argparse
import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# The commands whose flags come from a config dataclass (issue 17 item 8), and their siblings in the same files.
DOCUMENTED = [("train",), ("export",), ("dataset",), ("dataset", "build"), ("dataset", "info")]
DOCUMENTED += [("dataset", "index", "build"), ("dataset", "index", "query"), ("dataset", "index", "serve")]


def subparser(path: tuple[str, ...]) -> argparse.ArgumentParser:
    from lib_controlnet.cli import build_parser

    parser = build_parser()
    for name in path:
        action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        parser = action.choices[name]
    return parser


@pytest.mark.parametrize("path", DOCUMENTED, ids=" ".join)
def test_every_flag_has_one_line_of_help_and_its_default(path):
    parser = subparser(path)
    text = parser.format_help()
    for action in parser._actions:
        if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
            continue
        name = "/".join(action.option_strings) or action.dest
        assert action.help and action.help.strip(), f"{' '.join(path)} {name} has no description"
        assert "\n" not in action.help, f"{name}: more than one line"
        if action.option_strings:  # positionals have no default
            assert "(default: " in action.help % {"default": action.default}, f"{name} shows no default"
            assert action.option_strings[0] in text


def test_help_comes_from_the_config_fields():
    """One source: each field's metadata is what --help prints, with the field's own default."""
    from lib_controlnet.dataset.config import BuildConfig
    from lib_controlnet.flag_help import shown_default, default_of
    from lib_controlnet.train.config import TrainConfig

    for path, config in ((("train",), TrainConfig), (("dataset", "build"), BuildConfig)):
        by_dest = {a.dest: a for a in subparser(path)._actions}
        for field in dataclasses.fields(config):
            described = field.metadata.get("help")
            assert described, f"{config.__name__}.{field.name} has no help metadata"
            line = by_dest[field.name].help % {}
            assert line == f"{described} (default: {shown_default(default_of(field))})"
    train_help = subparser(("train",)).format_help()
    assert "(default: 500)" in train_help and "(default: constant)" in train_help


def test_detect_list_into_a_closed_pipe_ends_quietly():
    """`detect --list | head -2`: the reader has gone before the command writes; no traceback."""
    read, write = os.pipe()
    os.close(read)
    try:
        result = subprocess.run([sys.executable, "-m", "lib_controlnet", "detect", "--list"], stdout=write,
                                stderr=subprocess.PIPE, text=True, cwd=ROOT, timeout=120)
    finally:
        os.close(write)
    assert "Traceback" not in result.stderr and "BrokenPipeError" not in result.stderr, result.stderr
    assert result.returncode == 141

