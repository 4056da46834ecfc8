"""Standalone ControlNet generation on diffusers, outside the WebUI.

diffusers' own `StableDiffusionPipeline` does the sampling (the scheduler the base brings, CFG, noise from a
CPU generator seeded with the seed), and our diffusers host adds the units' residuals to its UNet, so with one
Balanced unit the images equal `StableDiffusionControlNetPipeline`'s on the same weights.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from lib_controlnet.control import ControlError, ControlJob, Controller, RowLayout
from lib_controlnet.errors import UserError
from lib_controlnet.hosts import diffusers as diffusers_host
from lib_controlnet.infotext import build_infotext, units_to_params
from lib_controlnet.settings import SHIPPED_CONFIGS_DIR
from lib_controlnet.unit import ControlUnit

BASE_CONFIGS_DIR = SHIPPED_CONFIGS_DIR / "base"
# diffusers scheduler class -> the WebUI's sampler name, for the infotext
SAMPLER_NAMES = {
    "PNDMScheduler": "PLMS", "DDIMScheduler": "DDIM", "EulerDiscreteScheduler": "Euler",
    "EulerAncestralDiscreteScheduler": "Euler a", "DPMSolverMultistepScheduler": "DPM++ 2M",
    "UniPCMultistepScheduler": "UniPC", "LMSDiscreteScheduler": "LMS", "HeunDiscreteScheduler": "Heun",
    "DDPMScheduler": "DDPM",
}


class BaseModelError(UserError):
    """The base checkpoint cannot be used (missing, wrong kind, unsupported family)."""


@dataclasses.dataclass
class GenerateRequest:
    base: str
    prompt: str
    units: list[ControlUnit]
    negative_prompt: str = ""
    steps: int = 20
    width: int = 512
    height: int = 512
    seed: int = 0
    guidance_scale: float = 7.5
    batch_size: int = 1
    base_config: Optional[str] = None  # diffusers config folder for a single-file base (default: shipped)
    device: str = "cpu"
    dtype: torch.dtype = torch.float32
    load_model: Optional[Callable] = None  # name or path -> ControlNetModel (default: the model registry/cache)
    on_step_end: Optional[Callable[[int], None]] = None  # called with the step index after each step

    def validate(self) -> None:
        if self.steps < 1:
            raise UserError(f"--steps must be at least 1, got {self.steps}.")
        if self.width % 8 or self.height % 8 or self.width < 64 or self.height < 64:
            raise UserError(f"--size must be at least 64x64 and a multiple of 8 on both sides, got "
                            f"{self.width}x{self.height}.")
        if self.batch_size < 1:
            raise UserError("--batch-size must be at least 1.")


@dataclasses.dataclass
class GenerateResult:
    images: list  # PIL images
    detected: dict[str, np.ndarray]  # "0" (or "0-1" for a unit's second image) -> detected map
    infotext: str


def detect_family(keys_and_shapes: dict) -> str:
    """sd15 / sd2 / sdxl from an ldm checkpoint's keys (SD2's attention projections are linear)."""
    if any(k.startswith("conditioner.embedders.") for k in keys_and_shapes):
        return "sdxl"
    for key, shape in keys_and_shapes.items():
        if key.endswith("input_blocks.1.1.proj_in.weight"):
            return "sd2" if len(shape) == 2 else "sd15"
    raise BaseModelError("The base file holds no Stable Diffusion UNet (model.diffusion_model.*).")


def load_base(path, config: Optional[str] = None, dtype=torch.float32):
    """A StableDiffusionPipeline from a diffusers folder or a single-file ldm checkpoint, offline."""
    from diffusers import StableDiffusionPipeline

    from lib_controlnet import tiny_models

    path = Path(path).expanduser()
    if not path.exists():
        raise BaseModelError(f"Base model {path} does not exist.")
    common = dict(safety_checker=None, requires_safety_checker=False, torch_dtype=dtype)
    if path.is_dir():
        if not (path / "model_index.json").exists():
            raise BaseModelError(f"{path} is a folder without model_index.json, so not a diffusers model.")
        return StableDiffusionPipeline.from_pretrained(str(path), local_files_only=True, **common)
    if config is None:
        from lib_controlnet.models.loading import read_header

        family = detect_family(read_header(path).shapes)
        if family == "sdxl":
            raise BaseModelError("SDXL single-file bases are not supported by the standalone generator yet; "
                                 "use SD1.5 or SD2, or a diffusers folder.")
        config = str(BASE_CONFIGS_DIR / family)
    # The shipped configs hold no tokenizer files: every SD1/SD2 tokenizer shares CLIP's vocabulary.
    try:
        return StableDiffusionPipeline.from_single_file(str(path), config=str(config), local_files_only=True,
                                                        tokenizer=tiny_models.tokenizer(), **common)
    except (OSError, ValueError, RuntimeError, KeyError) as error:
        reason = str(error).strip().splitlines()[0][:200] if str(error).strip() else type(error).__name__
        raise BaseModelError(f"Could not load {path.name} with the config in {config} ({reason}); pass "
                             f"--base-config with a diffusers config folder that matches it.") from None


def _detected_maps(controller: Controller) -> dict[str, np.ndarray]:
    maps = {}
    for prepared in controller.units:
        index = _unit_index(controller, prepared)
        sources = prepared.source if isinstance(prepared.source, list) else []
        for k, array in enumerate(sources):
            maps[str(index) if k == 0 else f"{index}-{k}"] = np.asarray(array, dtype=np.uint8)
    return maps


def _unit_index(controller: Controller, prepared) -> int:
    for i, item in enumerate(controller.job.units):
        if item is prepared.unit:
            return i
    return controller.units.index(prepared)


def generate(request: GenerateRequest, pipe=None) -> GenerateResult:
    """Run one job; `pipe` may be given to reuse a loaded base."""
    request.validate()
    if pipe is None:
        pipe = load_base(request.base, request.base_config, request.dtype)
    pipe = pipe.to(request.device)
    pipe.set_progress_bar_config(disable=True)
    units = list(request.units)
    job = ControlJob(units=units, width=request.width, height=request.height, steps=request.steps,
                     device=request.device, dtype=request.dtype, load_model=request.load_model)
    controller = Controller(job)
    # The sampling loop's length is the scheduler's (PNDM adds one step): start/end are fractions of it.
    pipe.scheduler.set_timesteps(request.steps)
    total = len(pipe.scheduler.timesteps)
    rows = (RowLayout.diffusers_cfg(request.batch_size) if request.guidance_scale > 1
            else RowLayout.all_cond(request.batch_size))

    def next_step(pipeline, step, timestep, callback_kwargs):
        controller.begin_step(step + 1, total)
        if request.on_step_end is not None:
            request.on_step_end(step)
        return callback_kwargs

    generator = torch.Generator("cpu").manual_seed(request.seed)
    with diffusers_host.hooked(pipe.unet, controller):
        controller.begin_step(0, total, rows)
        output = pipe(prompt=request.prompt, negative_prompt=request.negative_prompt or None,
                      num_inference_steps=request.steps, width=request.width, height=request.height,
                      guidance_scale=request.guidance_scale, num_images_per_prompt=request.batch_size,
                      generator=generator, callback_on_step_end=next_step)
    params = {
        "Steps": request.steps,
        "Sampler": SAMPLER_NAMES.get(type(pipe.scheduler).__name__, type(pipe.scheduler).__name__),
        "CFG scale": request.guidance_scale, "Seed": request.seed, "Size": f"{request.width}x{request.height}",
        "Model": Path(request.base).stem if request.base else None,
        **units_to_params(units),
    }
    return GenerateResult(images=list(output.images), detected=_detected_maps(controller),
                          infotext=build_infotext(request.prompt, request.negative_prompt, params))


def write_outputs(result: GenerateResult, out_dir) -> list[Path]:
    from PIL import Image

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for i, image in enumerate(result.images):
        written.append(out / f"image-{i}.png")
        image.save(written[-1])
    for name, array in result.detected.items():
        written.append(out / f"detected-{name}.png")
        Image.fromarray(array).save(written[-1])
    written.append(out / "infotext.txt")
    written[-1].write_text(result.infotext + "\n", encoding="utf-8")
    return written


__all__ = ["GenerateRequest", "GenerateResult", "generate", "load_base", "write_outputs", "ControlError"]
