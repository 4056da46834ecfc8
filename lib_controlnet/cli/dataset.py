"""`python -m lib_controlnet dataset build|info`: build a (image, caption, conditioning image) dataset."""
from __future__ import annotations

import json
import sys
import threading
import time


def register(subparsers) -> None:
    parser = subparsers.add_parser("dataset", help="build and inspect ControlNet training datasets")
    actions = parser.add_subparsers(dest="dataset_command", metavar="ACTION")

    build = actions.add_parser("build", help="build (or resume) a dataset; every option also reads from --config")
    build.add_argument("--config", help="YAML or JSON file of these options; flags override it (default: none)")
    build.add_argument("--quiet", action="store_true", help="no progress lines (default: off)")
    build.add_argument("--annotator-dir", default=None,
                       help="folder holding preprocessor weight files (default: the extension's models/annotators)")
    from lib_controlnet.dataset.config import add_cli_arguments

    add_cli_arguments(build)
    from lib_controlnet.cli.detect import add_download_flag

    add_download_flag(build)  # the flag the missing-weights sentence names
    build.set_defaults(func=_build)

    info = actions.add_parser("info", help="rows, columns, failures and build state of a dataset folder")
    info.add_argument("folder", help="the dataset folder (a build's --out)")
    info.add_argument("--json", action="store_true", help="print the facts as JSON (default: off)")
    info.set_defaults(func=_info)

    from lib_controlnet.cli.dataset_index import register as register_index

    register_index(actions)
    parser.set_defaults(func=lambda args: parser.print_help() or 2)


class _Printer:
    """A line when a stage starts, when its count moves (at most twice a second) and when it ends:
    readable in a terminal and in a log."""

    def __init__(self):
        self.last, self.last_time = None, 0.0

    def __call__(self, progress) -> None:
        now = time.monotonic()
        state = (progress.stage, progress.done, progress.total)
        if state == self.last:
            return
        boundary = self.last is None or progress.stage != self.last[0] or progress.done >= progress.total
        if boundary or progress.total <= 50 or now - self.last_time >= 0.5:  # small builds: every step
            print(progress.line(), flush=True)
            self.last, self.last_time = state, now


def _build(args) -> int:
    from pathlib import Path

    from lib_controlnet.cli.detect import apply_download_flag
    from lib_controlnet.dataset.config import config_from_args
    from lib_controlnet.dataset.job import run_build
    from lib_controlnet.settings import update_settings

    apply_download_flag(args)
    config = config_from_args(args)
    if args.annotator_dir:
        update_settings(annotator_models_path=Path(args.annotator_dir).expanduser().resolve())
    cancel = threading.Event()
    manifest = run_build(config, progress=None if args.quiet else _Printer(), cancel=cancel)
    counts = manifest["counts"]
    print(f"wrote {counts['written']} samples to {config.out_dir} ({counts['failed']} left out, see failures.jsonl)")
    return 0


def _info(args) -> int:
    from lib_controlnet.dataset.info import dataset_info, format_info

    info = dataset_info(args.folder)
    print(json.dumps(info, indent=2) if args.json else format_info(info))
    return 0 if info["complete"] else 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(2)
