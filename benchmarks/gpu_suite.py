"""Real-size figures on one CUDA GPU in under 8 minutes: sampling, training, preprocessors, dataset conditioning,
each against its peer in the same run. Random full-size weights built here from the shipped configs (nothing is
downloaded). Prints one markdown table and writes it with a JSON file of the same rows into --out.

    python benchmarks/gpu_suite.py --out gpu-suite-output        # on a CUDA GPU (make bench-gpu)
    python benchmarks/gpu_suite.py --tiny --out /tmp/suite        # the same code on the CPU, tiny models
    python benchmarks/gpu_suite.py --only sd15,train_sd15         # some sections

Sections (each with its own time limit; it reports what it measured before the limit):
  sd15, sdxl         per sampling step, fp16, at 512 / 1024 px: plain UNet; 1 and 3 ControlNets, Balanced and
                     "ControlNet is more important", through our diffusers host (lib_controlnet.generate) against
                     diffusers' ControlNet pipelines (guess_mode for the latter mode), and through our ldm host on
                     the WebUI's ldm UNetModel against that UNet alone; peak GPU memory over the steps
  train_sd15         our trainer's step vs train_controlnet.py's, 512 px, batch 4, fp16 mixed precision, with
                     and without gradient checkpointing: samples/s, peak GPU memory
  train_sdxl         the same at 1024 px, batch 1, against train_controlnet_sdxl.py's step, where our trainer
                     takes SDXL ("not available" with its reason where it refuses)
  preprocessors      canny, HED, depth (MiDaS), OpenPose, line art at 512 px: ours vs controlnet-aux, both on
                     the GPU, random weights under the real file names
  dataset            the dataset builder's conditioning stage, images/s, vs controlnet-aux image by image
Ratios are ours / peer; the table's "better" column says which way is good for each.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
for _name, _value in (("HF_HUB_OFFLINE", "1"), ("TRANSFORMERS_OFFLINE", "1"), ("DIFFUSERS_OFFLINE", "1"),
                      ("NO_ALBUMENTATIONS_UPDATE", "1"), ("GRADIO_ANALYTICS_ENABLED", "False")):
    os.environ.setdefault(_name, _value)

import lib_controlnet  # noqa: E402,F401  (torchvision repair first)
import torch  # noqa: E402

from benchmarks import _suite  # noqa: E402
from benchmarks._suite import Deadline, Device, Row  # noqa: E402

BUDGET_S = {False: 450.0, True: 120.0}  # the whole run: under 8 minutes on one H100, with start-up and imports


@dataclasses.dataclass
class Section:
    key: str
    title: str
    limit_s: float  # on the GPU
    tiny_limit_s: float
    run: Callable  # (ctx, deadline) -> list[Row]


def sections() -> list[Section]:
    from benchmarks._gpu_maps import dataset_section, preprocess_section
    from benchmarks._gpu_steps import sampling_section
    from benchmarks._gpu_train import training_section

    return [
        Section("sd15", "SD1.5 sampling", 70, 30, sampling_section("sd15")),
        Section("sdxl", "SDXL sampling", 120, 30, sampling_section("sdxl")),
        Section("train_sd15", "SD1.5 training", 100, 30, training_section("sd15")),
        Section("train_sdxl", "SDXL training", 70, 30, training_section("sdxl")),
        Section("preprocessors", "preprocessors", 55, 30, preprocess_section),
        Section("dataset", "dataset builder", 25, 30, dataset_section),
    ]


@dataclasses.dataclass
class Context:
    tiny: bool
    device: torch.device
    dev: Device
    dtype: torch.dtype
    work: Path  # scratch folder for tiny base folders and annotator weights
    map_size: int  # preprocessor / dataset image side


def run_suite(args) -> tuple[list[Row], dict]:
    device = torch.device("cpu" if args.tiny else "cuda")
    ctx = Context(tiny=args.tiny, device=device, dev=Device(device),
                  dtype=torch.float32 if args.tiny else torch.float16, work=Path(args.work),
                  map_size=64 if args.tiny else 512)
    total = Deadline(args.budget)
    chosen = [s for s in sections() if not args.only or s.key in args.only]
    rows: list[Row] = []
    spent = {}
    for section in chosen:
        if total.expired():
            rows.append(Row(section.title, "(whole section)", status=f"not measured: the suite's {args.budget:.0f} s "
                                                                     "were spent before it"))
            continue
        limit = section.tiny_limit_s if args.tiny else section.limit_s
        started = time.monotonic()
        print(f"-- {section.title} (limit {limit:.0f} s)", flush=True)
        try:
            got = section.run(ctx, Deadline(limit, total))
        except Exception as error:  # a broken section is reported, and the others still run
            traceback.print_exc()
            got = [Row(section.title, "(whole section)", status=f"failed: {type(error).__name__}: {error}"[:400])]
        finally:
            ctx.dev.free()
        spent[section.key] = round(time.monotonic() - started, 1)
        for row in got:
            shown = f"{row.ours:.4g} {row.unit}" if row.measured else row.status
            print(f"   {row.item}: {shown}" + (f", ratio {row.ratio:.3f}" if row.ratio is not None else ""), flush=True)
        rows.extend(got)
    import diffusers

    meta = dict(mode="tiny models on the CPU" if args.tiny else "full-size random weights, fp16",
                device_name=torch.cuda.get_device_name(0) if ctx.dev.cuda else "CPU", torch=torch.__version__,
                diffusers=diffusers.__version__, elapsed_s=args.budget - total.left(), section_seconds=spent,
                sections=[s.key for s in chosen], budget_s=args.budget)
    return rows, meta


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="tiny models on the CPU (what the test suite runs)")
    parser.add_argument("--out", default="gpu-suite-output", help="folder for gpu_suite.md and gpu_suite.json")
    parser.add_argument("--only", default="", help="comma-separated sections: " + ",".join(
        ("sd15", "sdxl", "train_sd15", "train_sdxl", "preprocessors", "dataset")))
    parser.add_argument("--budget", type=float, default=None, help="seconds for the whole run")
    args = parser.parse_args(argv)
    args.only = [s for s in args.only.split(",") if s]
    known = {s.key for s in sections()}
    if set(args.only) - known:
        parser.error(f"unknown section(s): {', '.join(sorted(set(args.only) - known))}; known: {', '.join(sorted(known))}")
    if not args.tiny and not torch.cuda.is_available():
        parser.error("no CUDA GPU is visible to this torch; run with --tiny for the CPU check")
    args.budget = args.budget or BUDGET_S[args.tiny]
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.disable_progress_bar()
    diffusers_logging.set_verbosity_error()
    if args.tiny:
        torch.set_num_threads(1)  # tiny models: one thread is fastest on a shared machine, and steadiest
    with tempfile.TemporaryDirectory(prefix="gpu-suite-") as work:
        args.work = work
        rows, meta = run_suite(args)
    md_path, json_path = _suite.write(Path(args.out), rows, meta)
    print()
    print(md_path.read_text(encoding="utf-8"))
    print(f"written: {md_path}, {json_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
