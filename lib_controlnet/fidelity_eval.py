"""`evaluate`: the control fidelity of any ControlNet file on any dataset, beside the no-ControlNet baseline.

The last N rows of the dataset are the held-out split (the same rows training holds out). Each row's prompt and
conditioning image go through the project's own generation path (diffusers sampling + our hook) once with the
ControlNet and once without; the preprocessor re-detects both outputs and the registry's score compares them
with the condition. The report folder holds report.md, report.json and grid.png (condition | generated |
re-detected | baseline | baseline re-detected).
"""
from __future__ import annotations

import dataclasses
import json
import tempfile
from pathlib import Path
from typing import Optional

import numpy as np
from PIL import Image, ImageDraw

from lib_controlnet.errors import UserError
from lib_controlnet.fidelity import Detector, FidelityError, FidelityResult, measure, module_of_dataset

GRID_COLUMNS = ("condition", "generated", "re-detected", "no ControlNet", "re-detected")


@dataclasses.dataclass
class EvaluateRequest:
    base: str
    controlnet: str
    dataset: str
    out: str
    module: str = ""  # "" = the dataset's own preprocessor (its manifest)
    n: int = 8
    resolution: int = 0  # 0 = the dataset's conditioning images' size, capped at 512
    steps: int = 20
    guidance_scale: float = 7.5
    seed: int = 0
    weight: float = 1.0
    base_config: Optional[str] = None


@dataclasses.dataclass
class Evaluation:
    controlnet: FidelityResult
    baseline: FidelityResult
    report: Path
    grid: Path


def heldout_rows(dataset: str, n: int, resolution: int = 0):
    """(prompt, hint, source image) of the dataset's last n rows, resized to `resolution` (a multiple of 8)."""
    from lib_controlnet.train.config import TrainConfig
    from lib_controlnet.train.data import open_records

    with tempfile.TemporaryDirectory(prefix="cn-eval-") as cache:
        records = open_records(TrainConfig(dataset=dataset), cache_dir=Path(cache))
        count = len(records)
        if count == 0:
            raise UserError(f"Dataset {dataset} holds no rows.")
        rows = []
        for index in range(max(0, count - n), count):
            image, hint, text = records.load(index)
            rows.append((text, hint.convert("RGB"), image.convert("RGB")))
    side = resolution or min(512, min(rows[0][1].size))
    side = max(64, side - side % 8)
    return [(text, hint.resize((side, side), Image.BICUBIC), image.resize((side, side), Image.BICUBIC))
            for text, hint, image in rows], side


def evaluate(request: EvaluateRequest, on_message=print) -> Evaluation:
    from lib_controlnet.base_model import load_pipeline
    from lib_controlnet.generate import GenerateRequest, generate
    from lib_controlnet.models import load_controlnet
    from lib_controlnet.preprocess import PreprocessorError, get_preprocessor
    from lib_controlnet.unit import ControlUnit

    if request.n < 1:
        raise UserError("--n must be at least 1.")
    module, threshold_a, threshold_b = module_of_dataset(request.dataset)
    module = request.module or module
    if not module:
        raise UserError(f"Dataset {request.dataset} does not say which preprocessor made its conditioning images; "
                        "pass --module (for example --module canny).")
    try:
        get_preprocessor(module)
    except PreprocessorError as error:
        raise UserError(str(error)) from None
    if request.module and request.module != module_of_dataset(request.dataset)[0]:
        threshold_a = threshold_b = None  # another preprocessor's thresholds would not fit
    controlnet_path = Path(request.controlnet).expanduser()
    if not controlnet_path.exists():
        raise UserError(f"ControlNet {request.controlnet} does not exist.")
    detector = Detector(module, threshold_a, threshold_b)
    rows, side = heldout_rows(request.dataset, request.n, request.resolution)
    on_message(f"evaluating {controlnet_path.name} on {len(rows)} held-out rows of {request.dataset} "
               f"({detector.score.name} through {module}, {side}x{side})")
    conditions = [detector.condition(hint, source) for _, hint, source in rows]
    model = load_controlnet(controlnet_path)
    pipe = load_base(load_pipeline, request)
    out = Path(request.out).expanduser()
    (out / "images").mkdir(parents=True, exist_ok=True)
    generated = {"controlnet": [], "baseline": []}
    for number, (prompt, hint, _) in enumerate(rows):
        hint_path = out / "images" / f"{number:02d}-condition.png"
        hint.save(hint_path)
        for kind in generated:
            units = [ControlUnit(model=controlnet_path.name, module="none", image=hint_path,
                                 weight=request.weight)] if kind == "controlnet" else []
            job = GenerateRequest(base=request.base, prompt=prompt, units=units, steps=request.steps, width=side,
                                  height=side, seed=request.seed + number, guidance_scale=request.guidance_scale,
                                  load_model=lambda name: model)
            image = generate(job, pipe).images[0]
            image.save(out / "images" / f"{number:02d}-{kind}.png")
            generated[kind].append(image)
    scored = measure(detector, conditions, generated["controlnet"])
    baseline = measure(detector, conditions, generated["baseline"])
    grid = fidelity_grid([hint for _, hint, _ in rows], generated["controlnet"], scored, generated["baseline"],
                         baseline, out / "grid.png")
    report = write_evaluation_report(out, request, module, scored, baseline, grid, side)
    on_message(f"{scored.score}: {scored.mean:.3f} with the ControlNet, {baseline.mean:.3f} without")
    return Evaluation(scored, baseline, report, grid)


def load_base(load_pipeline, request: EvaluateRequest):
    try:
        return load_pipeline(request.base, request.base_config)
    except UserError:
        raise
    except Exception as error:  # a folder that is not a model: one sentence, not a traceback
        raise UserError(f"Base model {request.base} could not be loaded: {error}") from None


def fidelity_grid(hints, generated, scored: FidelityResult, baseline_images, baseline: FidelityResult, path: Path,
                  cell: int = 128) -> Path:
    columns = [hints, generated, [Image.fromarray(m) for m in scored.detected], baseline_images,
               [Image.fromarray(m) for m in baseline.detected]]
    header = 18
    grid = Image.new("RGB", (len(columns) * cell, header + len(hints) * cell), "white")
    draw = ImageDraw.Draw(grid)
    for column, title in enumerate(GRID_COLUMNS):
        draw.text((column * cell + 4, 3), title, fill="black")
    for column, images in enumerate(columns):
        for row, image in enumerate(images):
            grid.paste(image.convert("RGB").resize((cell, cell)), (column * cell, header + row * cell))
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)
    return path


def write_evaluation_report(out: Path, request: EvaluateRequest, module: str, scored: FidelityResult,
                            baseline: FidelityResult, grid: Path, side: int) -> Path:
    from lib_controlnet.fidelity import SCORES

    definition = SCORES[scored.score].definition
    summary = {
        "controlnet": str(request.controlnet), "base": str(request.base), "dataset": str(request.dataset),
        "module": module, "score": scored.score, "definition": definition, "samples": len(scored.values),
        "resolution": side, "steps": request.steps, "guidance_scale": request.guidance_scale, "seed": request.seed,
        "weight": request.weight, "fidelity": scored.mean, "baseline_fidelity": baseline.mean,
        "per_sample": scored.values, "baseline_per_sample": baseline.values,
    }
    (out / "report.json").write_text(json.dumps(summary, indent=2), encoding="utf-8")
    ratio = f"{scored.mean / baseline.mean:.2f}x the baseline" if baseline.mean > 0 else "baseline scores 0"
    lines = [
        "# Control fidelity", "",
        f"- ControlNet: `{request.controlnet}` (weight {request.weight})", f"- Base: `{request.base}`",
        f"- Dataset: `{request.dataset}`, its last {len(scored.values)} rows, {side}x{side}",
        f"- Score: **{scored.score}** through `{module}`: {definition}", "",
        "| | fidelity |", "|---|---|",
        f"| with the ControlNet | {scored.mean:.4f} |", f"| without (same prompts and seeds) | {baseline.mean:.4f} |",
        "", f"With the ControlNet: {ratio}.", "",
        "## Condition | generated | re-detected | no ControlNet | re-detected", "", f"![grid]({grid.name})", "",
        "## Per sample", "", "| row | with | without |", "|---|---|---|",
    ]
    lines += [f"| {i} | {a:.4f} | {b:.4f} |" for i, (a, b) in enumerate(zip(scored.values, baseline.values))]
    report = out / "report.md"
    report.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return report


def mean_or_nan(values) -> float:
    return float(np.mean(values)) if len(values) else float("nan")


__all__ = ["EvaluateRequest", "Evaluation", "evaluate", "heldout_rows", "FidelityError"]
