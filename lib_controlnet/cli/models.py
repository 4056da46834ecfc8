"""`python -m lib_controlnet models list|info|convert`: see and convert ControlNet model files."""
from __future__ import annotations

import json
from pathlib import Path

from lib_controlnet.errors import UserError


def _list(args) -> int:
    from lib_controlnet.models import ModelRegistry, get_registry

    registry = ModelRegistry(args.dir) if args.dir else get_registry()
    entries = registry.entries()
    if not entries:
        print(f"no ControlNet models in {', '.join(str(d) for d in registry.dirs())}")
        return 0
    for entry in entries:
        print(f"{entry.name}\t{entry.path}")
    return 0


def _info(args) -> int:
    from lib_controlnet.models import inspect_model

    info = inspect_model(Path(args.file))
    summary = info.summary()
    if args.json:
        print(json.dumps(dict(summary, config=info.config, metadata=info.metadata), indent=2))
        return 0
    width = max(len(k) for k in summary)
    for key, value in summary.items():
        shown = f"{value:,}" if key == "parameters" else value
        print(f"{key:<{width}}  {shown}")
    return 0


def _convert(args) -> int:
    from lib_controlnet.models import inspect_model, load_controlnet, save_controlnet_diffusers, save_controlnet_ldm

    source, target = Path(args.input), Path(args.output)
    if target.resolve() == source.resolve():
        raise UserError("The output must differ from the input.")
    if target.exists() and not args.force:
        raise UserError(f"{target} already exists; use --force to overwrite it.")
    info = inspect_model(source)
    model = load_controlnet(source, info=info)
    dtype = args.dtype or info.dtype
    if args.to == "ldm":
        if target.suffix.lower() != ".safetensors":
            raise UserError("For --to ldm the output must be a .safetensors file.")
        save_controlnet_ldm(model, target, dtype=dtype, metadata={"converted_from": source.name})
    else:
        if target.suffix:
            raise UserError("For --to diffusers the output must be a folder (a path without an extension).")
        save_controlnet_diffusers(model, target, dtype=dtype)
    print(f"wrote {target} ({args.to}, {dtype}, base {info.base_label})")
    return 0


def register(subparsers) -> None:
    parser = subparsers.add_parser("models", help="list, inspect and convert ControlNet model files")
    commands = parser.add_subparsers(dest="models_command", metavar="ACTION", required=True)

    listing = commands.add_parser("list", help='list models as "name [hash]" with their paths')
    listing.add_argument("--dir", action="append", type=Path, help="folder to scan instead of the configured ones "
                         "(repeatable)")
    listing.set_defaults(func=_list)

    info = commands.add_parser("info", help="format, base model, dtype and parameter count of a file or folder")
    info.add_argument("file")
    info.add_argument("--json", action="store_true", help="print JSON, with the diffusers config")
    info.set_defaults(func=_info)

    convert = commands.add_parser("convert", help="convert between ldm safetensors and a diffusers folder")
    convert.add_argument("input")
    convert.add_argument("output")
    convert.add_argument("--to", choices=("ldm", "diffusers"), required=True)
    convert.add_argument("--dtype", choices=("fp16", "fp32", "bf16"), help="default: the input's dtype")
    convert.add_argument("--force", action="store_true", help="overwrite the output")
    convert.set_defaults(func=_convert)
