"""`python -m lib_controlnet detect`: run one preprocessor on an image file, or list them all."""
from __future__ import annotations

import json
from pathlib import Path

from lib_controlnet.errors import UserError
from lib_controlnet.settings import ANNOTATOR_PRECISIONS

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def add_download_flag(parser) -> None:
    """The flag the missing-weights sentence names (annotators.weights.DOWNLOAD_HINTS), for every command that
    runs preprocessors."""
    from annotators.weights import DOWNLOAD_FLAG

    if DOWNLOAD_FLAG in parser._option_string_actions:  # a command whose own options already have it
        return
    parser.add_argument(DOWNLOAD_FLAG, dest="allow_annotator_downloads", action="store_true",
                        help="download missing preprocessor weights from Hugging Face (default: off, use local files)")


def apply_download_flag(args, surface: str = "cli") -> None:
    from annotators import weights
    from lib_controlnet.settings import update_settings

    weights.use_surface(surface)
    if getattr(args, "allow_annotator_downloads", False):
        update_settings(allow_annotator_downloads=True)


def _list() -> int:
    from lib_controlnet import preprocess

    for label in preprocess.list_modules(alias_names=True):
        pre = preprocess.get_preprocessor(label)
        sliders = ", ".join(f"{s['name']} {s['min']}..{s['max']} (default {s['value']})"
                            for s in pre.sliders() if s)  # the sliders that act (the panel's), ranges from the registry
        kind = "model-free" if pre.model_free else "needs weights"
        alias = f" (= {pre.name})" if pre.name != pre.label else ""
        print(f"{label}{alias}\t[{pre.control_type}, {kind}]\t{sliders}")
    return 0


def _detect(args) -> int:
    import cv2

    from lib_controlnet import images, preprocess
    from lib_controlnet.settings import update_settings

    if not args.input or not args.output:
        raise UserError("detect needs an input image and an output file (or --list).")
    if args.annotator_dir:
        update_settings(annotator_models_path=Path(args.annotator_dir))
    update_settings(annotator_precision=args.precision)
    apply_download_flag(args)
    source = Path(args.input)
    if source.is_dir():
        raise UserError(f"{source} is a folder; detect reads one image file (run it once per image).")
    if not source.exists():
        raise UserError(f"No such input image: {source}.")
    if not source.is_file():
        raise UserError(f"{source} is not a regular file; give an image file.")
    image = images.to_rgb_array(source)
    if args.pose_json:
        result, keypoints = preprocess.run_pose(args.module, image, resolution=args.res)
        Path(args.pose_json).write_text(json.dumps(keypoints))
    else:
        result = preprocess.run(args.module, image, resolution=args.res, threshold_a=args.threshold_a,
                                threshold_b=args.threshold_b, mask=Path(args.mask) if args.mask else None,
                                use_cache=False)
    target = Path(args.output)
    if target.suffix.lower() not in IMAGE_SUFFIXES:
        raise UserError(f"Cannot write {target.name}: use a .png, .jpg, .webp or .bmp file name.")
    target.parent.mkdir(parents=True, exist_ok=True)
    bgr = cv2.cvtColor(result, cv2.COLOR_RGBA2BGRA if result.shape[2] == 4 else cv2.COLOR_RGB2BGR)
    if not cv2.imwrite(str(target), bgr):
        raise UserError(f"Could not write {target}.")
    print(f"{preprocess.get_preprocessor(args.module).label}: {result.shape[1]}x{result.shape[0]} -> {target}")
    return 0


def register(subparsers) -> None:
    parser = subparsers.add_parser("detect", help="run a preprocessor on an image (or --list them)")
    parser.add_argument("--list", action="store_true", help="list preprocessors, their sliders and control types")
    parser.add_argument("--module", default="canny", help="preprocessor name or alias (default: canny)")
    from lib_controlnet.preprocess import RESOLUTION

    parser.add_argument("--res", type=int, default=None,
                        help=f"preprocessor resolution, {RESOLUTION.min:g}..{RESOLUTION.max:g} "
                             f"(default {RESOLUTION.value:g})")
    parser.add_argument("--threshold-a", type=float, default=None, help="first slider (see --list)")
    parser.add_argument("--threshold-b", type=float, default=None, help="second slider (see --list)")
    parser.add_argument("--mask", default=None, help="mask image for the inpaint preprocessors")
    parser.add_argument("--pose-json", default=None, help="openpose*: also write the keypoints (OpenPose JSON)")
    parser.add_argument("--annotator-dir", default=None, help="folder holding annotator weight files")
    add_download_flag(parser)
    parser.add_argument("--precision", choices=ANNOTATOR_PRECISIONS, default="auto",
                        help="preprocessor networks: auto (bfloat16 where this CPU runs it faster: AMX, or "
                             "avx512_bf16 measured so), float32 (exactly controlnet-aux's maps) or bfloat16")
    parser.add_argument("input", nargs="?", help="input image file")
    parser.add_argument("output", nargs="?", help="output map file (.png)")
    parser.set_defaults(func=lambda args: _list() if args.list else _detect(args))
