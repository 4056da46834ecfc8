"""`python -m lib_controlnet train --config FILE [--flag value ...]` and `python -m lib_controlnet export CKPT OUT`.

Both run unchanged under `accelerate launch -m lib_controlnet train ...` for several processes.
"""
from __future__ import annotations

import sys


def register(subparsers) -> None:
    from lib_controlnet.train.config import add_arguments

    train = subparsers.add_parser("train", help="train a ControlNet on a dataset (config file and/or flags)",
                                  description="Train a ControlNet. Every setting of a config file can also be "
                                              "given as a flag (--max-train-steps 100); flags win.")
    train.add_argument("--config", help="YAML or JSON file of training settings (default: none)")
    train.add_argument("--no-export", action="store_true", help="do not export the ControlNet at the end (default: off)")
    train.add_argument("--quiet", action="store_true", help="print only the final lines (default: off)")
    add_arguments(train)
    train.set_defaults(func=run_train)

    export = subparsers.add_parser("export", help="export a training checkpoint as an ldm ControlNet .safetensors")
    export.add_argument("checkpoint", metavar="CKPT", help="checkpoint folder, or a training output folder (newest)")
    export.add_argument("out", metavar="OUT", help="a .safetensors file, or a folder to write into")
    export.add_argument("--dtype", choices=("fp16", "fp32"), default="fp16",
                        help="precision of the exported weights (default: %(default)s)")
    export.add_argument("--diffusers", action="store_true",
                        help="also write a diffusers folder beside the file (default: off)")
    export.set_defaults(func=run_export)


def run_train(args) -> int:
    from lib_controlnet.train.config import config_from_args
    from lib_controlnet.train.trainer import TrainCallbacks, Trainer

    config = config_from_args(args)
    if args.quiet:  # diffusers' "Loading pipeline components" bars too
        from diffusers.utils import logging as diffusers_logging

        diffusers_logging.disable_progress_bar()
    last_print = [0.0]

    def on_progress(progress) -> None:
        if args.quiet:
            return
        if progress.step == progress.total_steps or progress.elapsed_s - last_print[0] >= 2.0 or progress.step == 1:
            last_print[0] = progress.elapsed_s
            print(f"step {progress.step}/{progress.total_steps}  loss {progress.loss:.5f}  lr {progress.lr:.2e}  "
                  f"ETA {progress.eta_s:.0f}s", flush=True)

    def on_message(text: str) -> None:
        if not args.quiet:
            print(text, flush=True)

    trainer = Trainer(config, TrainCallbacks(on_progress=on_progress, on_message=on_message), export=not args.no_export)
    result = trainer.run()
    if not trainer.accelerator.is_main_process:
        return 0
    if result.cancelled:
        print(f"cancelled at step {result.steps}; resume with --resume-from latest", file=sys.stderr)
    print(f"checkpoint: {result.checkpoint}")
    if result.exported:
        print(f"exported: {result.exported}")
    print(f"report: {result.report}")
    return 0


def run_export(args) -> int:
    from lib_controlnet.train.export import export_checkpoint

    exported = export_checkpoint(args.checkpoint, args.out, dtype=args.dtype, diffusers=args.diffusers)
    if exported.diffusers_dir:
        print(f"diffusers folder: {exported.diffusers_dir}")
    print(f"exported: {exported.file}")
    return 0
