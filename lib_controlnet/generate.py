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

from lib_controlnet.base_model import BaseModelError, load_pipeline as load_base, pipeline_architecture
from lib_controlnet.control import ControlError, ControlJob, Controller, RowLayout
from lib_controlnet.errors import UserError
from lib_controlnet.hosts import diffusers as diffusers_host
from lib_controlnet.infotext import build_infotext, units_to_params
from lib_controlnet.unit import ControlUnit

# diffusers scheduler class -> the WebUI's sampler name, for the infotext
SAMPLER_NAMES = {
    "PNDMScheduler": "PLMS", "DDIMScheduler": "DDIM", "EulerDiscreteScheduler": "Euler",
    "EulerAncestralDiscreteScheduler": "Euler a", "DPMSolverMultistepScheduler": "DPM++ 2M",
    "UniPCMultistepScheduler": "UniPC", "LMSDiscreteScheduler": "LMS", "HeunDiscreteScheduler": "Heun",
    "DDPMScheduler": "DDPM",
}


# Seeds as torch's generators take them. The WebUI 1.10.1 seeds its noise with torch.Generator.manual_seed(seed)
# and does not wrap seeds, so beyond this range it fails (HTTP 500); we refuse them with a sentence instead.
# Negative seeds other than -1 are seeded as torch maps them, as in the WebUI.
SEED_MIN, SEED_MAX = -(2 ** 63), 2 ** 64 - 1


def seed_error(seed) -> Optional[str]:
    """Why `seed` cannot seed a generation (-1: random, for the callers that pick one), or None."""
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        return f"must be a whole number, got {seed!r}"
    if not SEED_MIN <= int(seed) <= SEED_MAX:
        return f"must be -1 (random) or a whole number from {SEED_MIN} to {SEED_MAX}, got {seed}"
    return None


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
    # SDXL micro-conditioning, as (height, width) / (top, left); None means what the WebUI and diffusers use:
    # original and target size = the image size, crop (0, 0)
    original_size: Optional[tuple] = None
    crop_top_left: Optional[tuple] = None
    target_size: Optional[tuple] = None
    prediction_type: str = "auto"  # "auto" (the file's v_pred marker, else the config's), "epsilon", "v_prediction"
    vae: Optional[str] = None  # a VAE file replacing the base's (lib_controlnet.vae_file); a given `pipe` keeps it

    def validate(self) -> None:
        if self.steps < 1:
            raise UserError(f"--steps must be at least 1, got {self.steps}.")
        if self.width % 8 or self.height % 8 or self.width < 64 or self.height < 64:
            raise UserError(f"--size must be at least 64x64 and a multiple of 8 on both sides, got "
                            f"{self.width}x{self.height}.")
        if self.batch_size < 1:
            raise UserError("--batch-size must be at least 1.")
        problem = seed_error(self.seed)
        if problem:
            raise UserError(f"--seed {problem}.")


@dataclasses.dataclass
class GenerateResult:
    images: list  # PIL images
    detected: dict[str, np.ndarray]  # "0" (or "0-1" for a unit's second image) -> detected map
    infotext: str


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
        pipe = load_base(request.base, request.base_config, request.dtype, request.prediction_type)
    if request.vae:
        from lib_controlnet.vae_file import load_vae_file

        pipe.vae = load_vae_file(request.vae, pipe.vae).to(dtype=request.dtype)
    pipe = pipe.to(request.device)
    pipe.set_progress_bar_config(disable=True)
    units = list(request.units)
    job = ControlJob(units=units, width=request.width, height=request.height, steps=request.steps,
                     device=request.device, dtype=request.dtype, load_model=request.load_model)
    # reference units: the base's VAE and noise schedule; their noise seeded with the job's seed
    job.encode_latent, job.alphas_cumprod = diffusers_host.vae_encoder(pipe.vae), pipe.scheduler.alphas_cumprod
    job.reference_seed = request.seed
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
    extra = {}
    if pipeline_architecture(pipe).is_sdxl:
        size = (request.height, request.width)
        extra = dict(original_size=tuple(request.original_size or size), target_size=tuple(request.target_size or size),
                     crops_coords_top_left=tuple(request.crop_top_left or (0, 0)))
    with diffusers_host.hooked(pipe.unet, controller):
        controller.begin_step(0, total, rows)
        output = pipe(prompt=request.prompt, negative_prompt=request.negative_prompt or None,
                      num_inference_steps=request.steps, width=request.width, height=request.height,
                      guidance_scale=request.guidance_scale, num_images_per_prompt=request.batch_size,
                      generator=generator, callback_on_step_end=next_step, **extra)
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


__all__ = ["GenerateRequest", "GenerateResult", "generate", "load_base", "write_outputs", "ControlError", "BaseModelError"]
