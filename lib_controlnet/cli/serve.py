"""`python -m lib_controlnet serve`: the standalone app and HTTP API on one local server."""
from __future__ import annotations

import argparse
from pathlib import Path

from lib_controlnet.errors import UserError
from lib_controlnet.settings import ANNOTATOR_PRECISIONS


def register(subparsers) -> None:
    parser = subparsers.add_parser("serve", help="serve the ControlNet panel, Dataset and Train tabs and the HTTP API")
    parser.add_argument("--base", type=Path, default=None,
                        help="base model for generation: a diffusers folder or a single-file SD checkpoint")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1, this machine only)")
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument("--models-dir", type=Path, action="append", default=[],
                        help="extra folder to scan for ControlNet models (repeatable)")
    parser.add_argument("--annotator-dir", type=Path, default=None, help="folder holding preprocessor weights")
    parser.add_argument("--unit-count", type=int, default=None, help="number of ControlNet units in the panel")
    parser.add_argument("--annotator-precision", choices=ANNOTATOR_PRECISIONS, default="auto",
                        help="preprocessor networks: auto (bfloat16 where this CPU runs it faster: AMX, or "
                             "avx512_bf16 measured so), float32 or bfloat16")
    from lib_controlnet.cli.detect import add_download_flag

    add_download_flag(parser)
    parser.set_defaults(func=run)


def _check(args: argparse.Namespace) -> None:
    if args.base is not None and not args.base.exists():
        raise UserError(f"--base {args.base} does not exist.")
    for folder in args.models_dir:
        if not folder.is_dir():
            raise UserError(f"--models-dir {folder} is not a folder.")
    if not 0 < args.port < 65536:
        raise UserError(f"--port must be 1..65535, got {args.port}.")
    if args.unit_count is not None and not 1 <= args.unit_count <= 10:
        raise UserError(f"--unit-count must be 1..10, got {args.unit_count}.")


def run(args: argparse.Namespace) -> int:
    _check(args)
    import uvicorn

    from lib_controlnet.app import AppOptions, create_app
    from lib_controlnet.settings import get_settings, update_settings

    changes = {"annotator_precision": args.annotator_precision}
    if args.models_dir:
        changes["model_dirs"] = list(get_settings().model_dirs) + [p.resolve() for p in args.models_dir]
    if args.annotator_dir:
        changes["annotator_models_path"] = args.annotator_dir.resolve()
    if args.unit_count:
        changes["unit_count"] = args.unit_count
    update_settings(**changes)
    from lib_controlnet.cli.detect import apply_download_flag

    apply_download_flag(args, surface="serve")
    app = create_app(AppOptions(base=args.base, unit_count=args.unit_count))
    print(f"ControlNet Studio on http://{args.host}:{args.port}", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0
