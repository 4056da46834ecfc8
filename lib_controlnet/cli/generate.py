"""`python -m lib_controlnet generate`: ControlNet text-to-image on diffusers, offline, outside the WebUI."""
from __future__ import annotations

import argparse
from pathlib import Path

from lib_controlnet.errors import UserError
from lib_controlnet.unit import ControlUnit

# --unit keys -> ControlUnit fields (the short ones the brief's command line uses, plus every field name)
UNIT_KEYS = {"start": "guidance_start", "end": "guidance_end", "mode": "control_mode", "resize": "resize_mode",
             "res": "processor_res", "a": "threshold_a", "b": "threshold_b", "hr": "hr_option",
             "union": "union_control_type"}


def parse_unit(text: str) -> ControlUnit:
    """`module=canny,model=NAME|PATH,image=PATH[,weight=..,start=..,end=..,mode=..]` -> ControlUnit."""
    values = {}
    for part in text.split(","):
        if not part.strip():
            continue
        if "=" not in part:
            raise UserError(f"--unit part {part!r} is not key=value (e.g. module=canny,model=NAME,image=PATH).")
        key, value = (s.strip() for s in part.split("=", 1))
        values[UNIT_KEYS.get(key, key)] = value
    from lib_controlnet.reference import is_reference

    for required in ("image",) if is_reference(values.get("module")) else ("model", "image"):
        if required not in values:
            raise UserError(f"--unit {text!r} needs {required}=...")
    values.setdefault("module", "none")
    image = Path(values["image"]).expanduser()
    if not image.is_file():
        raise UserError(f"--unit image {values['image']!r} is not a file.")
    values["image"] = image  # a Path: image strings are read as base64 only
    return ControlUnit.from_dict(values)


def parse_size(text: str) -> tuple[int, int]:
    try:
        width, height = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"size must look like 512x512, got {text!r}") from None
    return width, height


def register(subparsers) -> None:
    parser = subparsers.add_parser("generate", help="generate images with ControlNet units (diffusers, offline)")
    parser.add_argument("--base", required=True, help="single-file SD1.x/SD2.x/SDXL file or a diffusers folder")
    parser.add_argument("--base-config", help="diffusers config folder for a single-file base (default: shipped)")
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--negative-prompt", default="")
    parser.add_argument("--unit", action="append", default=[],
                        help="module=canny,model=NAME|PATH,image=PATH[,weight=..,start=..,end=..,mode=..]")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--size", type=parse_size, default=(512, 512), help="WxH, e.g. 512x512")
    parser.add_argument("--seed", type=int, default=0, help="noise seed, as the WebUI takes it (default 0)")
    parser.add_argument("--guidance-scale", type=float, default=7.5)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--prediction-type", default="auto", choices=("auto", "epsilon", "v_prediction"),
                        help="auto: the file's v_pred marker, else the base config's")
    parser.add_argument("--vae", default=None, help="VAE file replacing the base's (ldm or diffusers keys, e.g. "
                        "sdxl-vae-fp16-fix's); default: the base's own")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--annotator-dir", default=None,
                        help="folder holding annotator weight files (clip_vision/clip_h.pth for IP-Adapter units)")
    from lib_controlnet.cli.detect import add_download_flag

    add_download_flag(parser)
    parser.set_defaults(func=run)


def run(args) -> int:
    from diffusers.utils import logging as diffusers_logging

    from lib_controlnet.cli.detect import apply_download_flag
    from lib_controlnet.generate import GenerateRequest, generate, write_outputs

    diffusers_logging.disable_progress_bar()
    apply_download_flag(args)
    if args.annotator_dir:
        from pathlib import Path

        from lib_controlnet.settings import update_settings

        update_settings(annotator_models_path=Path(args.annotator_dir))

    request = GenerateRequest(base=args.base, prompt=args.prompt, negative_prompt=args.negative_prompt,
                              units=[parse_unit(text) for text in args.unit], steps=args.steps, width=args.size[0], height=args.size[1],
                              seed=args.seed, guidance_scale=args.guidance_scale, batch_size=args.batch_size,
                              base_config=args.base_config, prediction_type=args.prediction_type, vae=args.vae)
    for path in write_outputs(generate(request), args.out):
        print(path)
    return 0
