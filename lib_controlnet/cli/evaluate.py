"""`python -m lib_controlnet evaluate --base B --controlnet C --dataset D [--module M] [--n N]`: how well a
ControlNet follows its condition on a dataset (control fidelity), beside the same prompts without it."""
from __future__ import annotations

from pathlib import Path


def register(subparsers) -> None:
    evaluate = subparsers.add_parser(
        "evaluate",
        help="control fidelity of a ControlNet on a dataset's held-out rows, with the no-ControlNet baseline",
        description="Generate from the dataset's last N (prompt, conditioning image) rows with and without the "
                    "ControlNet, re-detect each image with the preprocessor and score the agreement.")
    evaluate.add_argument("--base", required=True, help="base model: diffusers folder or SD checkpoint file")
    evaluate.add_argument("--controlnet", required=True, help="ControlNet file or diffusers folder to evaluate")
    evaluate.add_argument("--dataset", required=True, help="dataset folder (built by `dataset build`, a "
                                                           "save_to_disk dataset, or images/ + conditioning/)")
    evaluate.add_argument("--module", default="", help="preprocessor that re-detects the condition (default: the "
                                                       "one the dataset was built with)")
    evaluate.add_argument("--n", type=int, default=8, help="held-out rows to score, the dataset's last (default 8)")
    evaluate.add_argument("--out", default="", help="report folder (default: evaluate-<controlnet name>)")
    evaluate.add_argument("--resolution", type=int, default=0,
                          help="generation size (default 0: the conditioning images' size, at most 512)")
    evaluate.add_argument("--steps", type=int, default=20, help="sampling steps (default 20)")
    evaluate.add_argument("--cfg", type=float, default=7.5, help="guidance scale (default 7.5)")
    evaluate.add_argument("--seed", type=int, default=0, help="seed of the first row; row i uses seed+i (default 0)")
    evaluate.add_argument("--weight", type=float, default=1.0, help="ControlNet weight (default 1.0)")
    evaluate.add_argument("--base-config", default=None, help="diffusers config folder for a single-file base "
                                                              "(default: the shipped one for its family)")
    evaluate.set_defaults(func=run)


def run(args) -> int:
    from lib_controlnet.fidelity_eval import EvaluateRequest, evaluate

    out = args.out or f"evaluate-{Path(args.controlnet).stem}"
    request = EvaluateRequest(base=args.base, controlnet=args.controlnet, dataset=args.dataset, out=out,
                              module=args.module, n=args.n, resolution=args.resolution, steps=args.steps,
                              guidance_scale=args.cfg, seed=args.seed, weight=args.weight,
                              base_config=args.base_config)
    result = evaluate(request)
    print(f"report: {result.report}")
    return 0
