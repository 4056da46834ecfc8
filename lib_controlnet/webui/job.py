"""One WebUI generation with ControlNet: units prepared once, the UNet hooked for each sampling pass, the
step and the CFG batch layout fed to the controller, and the hooks always taken out again.

The WebUI has no single call that wraps a whole job, so the hook's `with` block is held open in an ExitStack:
it is closed before each new sampling pass, in `postprocess` (success and Interrupt, which the WebUI's
samplers turn into an early return), and in `p.close()`, which the WebUI calls in a `finally` for every job,
including one that raised.
"""
from __future__ import annotations

import contextlib
import dataclasses
from typing import Optional

import numpy as np

from lib_controlnet.ui.batch_folder import pick
from lib_controlnet.unit import ControlUnit


@dataclasses.dataclass
class UnitPlan:
    index: int  # the unit's tab number, as infotext numbers it
    unit: ControlUnit
    batch_images: Optional[list] = None  # batch mode: one control image per generated image, cycling
    batch_masks: Optional[list] = None


def _n_rows(cond, fallback: int) -> int:
    """Rows of a conditioning: a tensor (SD1/SD2) or SDXL's dict {"crossattn": ..., "vector": ...}."""
    if isinstance(cond, dict):
        cond = cond.get("crossattn")
    return int(cond.shape[0]) if hasattr(cond, "shape") else fallback


def _rows_for(params, skip_uncond: bool):
    """The WebUI CFG denoiser's x_in layout at this step, from what on_cfg_denoiser sees."""
    from lib_controlnet.control import RowLayout

    n_rows = int(params.x.shape[0])
    n_images = _n_rows(params.text_uncond, n_rows)
    n_cond = _n_rows(params.text_cond, n_rows - n_images)
    extra = int(params.x.shape[0]) - n_cond
    is_edit_model = n_images > 0 and extra == 2 * n_images  # instruct-pix2pix: text-uncond and image-uncond rows
    repeats = [n_cond // max(n_images, 1)] * n_images
    return RowLayout.webui_cfg(repeats, skip_uncond=skip_uncond, is_edit_model=is_edit_model)


def _reference_inputs(p):
    """Reference units: the loaded model's VAE (as the WebUI encodes img2img inputs) and its noise schedule (SDXL
    models get alphas_cumprod from the WebUI too)."""
    sd_model = p.sd_model

    def encode(images):
        from modules import sd_samplers_common

        return sd_samplers_common.images_tensor_to_samples(images, model=sd_model)

    return encode, getattr(sd_model, "alphas_cumprod", None)


class WebUIJob:
    """Lives on `p` from `process` to `postprocess`/`close`."""

    def __init__(self, plans: list[UnitPlan], p):
        self.plans = plans
        self.width, self.height = int(p.width), int(p.height)
        self.steps = int(p.steps)
        self.hires_fix = bool(getattr(p, "enable_hr", False))
        self._prepared: Optional[list] = None
        self._prepared_for: Optional[int] = None
        self._stack: Optional[contextlib.ExitStack] = None
        self.controller = None
        self.detected_maps: list = []  # (unit index, HxWx3 uint8 at the preprocessor's size), every batch

    # ------------------------------------------------------------------ preparing units
    def _units_for_batch(self, p) -> list[ControlUnit]:
        units = []
        start = int(getattr(p, "iteration", 0)) * int(p.batch_size)
        for plan in self.plans:
            unit = plan.unit
            if plan.batch_images:
                picks = pick(plan.batch_images, start, p.batch_size)
                if plan.batch_masks:
                    masks = pick(plan.batch_masks, start, p.batch_size)
                    picks = [{"image": img, "mask": m} for img, m in zip(picks, masks)]
                else:
                    picks = list(picks)
                unit = unit.replace(image=picks)
            units.append(unit)
        return units

    def _prepare(self, p):
        from lib_controlnet.control import ControlJob, prepare_units

        batch_mode = any(plan.batch_images for plan in self.plans)
        key = int(getattr(p, "iteration", 0)) if batch_mode else 0
        if self._prepared is not None and self._prepared_for == key:
            return self._prepared
        from modules import devices

        job = ControlJob(units=self._units_for_batch(p), width=self.width, height=self.height, steps=self.steps,
                         device=devices.device, dtype=getattr(devices, "dtype_unet", devices.dtype),
                         hires_fix=self.hires_fix)
        job.encode_latent, job.alphas_cumprod = _reference_inputs(p)
        job.reference_seed = int((getattr(p, "seeds", None) or [getattr(p, "seed", 0)])[0])
        self._prepared = prepare_units(job)
        self._prepared_for = key
        self._job = job
        for plan, prepared in zip(self.plans, self._prepared):
            if _encodes_image(plan.unit.module):
                continue  # image prompts show no map, as in the other extension (its clients count the images)
            for detected in (prepared.source if isinstance(prepared.source, list) else []):
                self.detected_maps.append((plan.index, np.asarray(detected)))
        return self._prepared

    def output_maps(self, p) -> list[tuple[int, np.ndarray]]:
        """(unit index, map) as the job shows them after its images: each detected map brought to the size it
        controls, as the unit's resize mode brings it there. A hires-fix job gives the hires-size map, then the
        first-pass one, unit by unit: the other WebUI ControlNet extension's order, which its clients index."""
        from lib_controlnet import images

        sizes = [(self.width, self.height)]
        if self.hires_fix:
            hr_w = int(getattr(p, "hr_upscale_to_x", 0) or 0) or int(self.width * float(getattr(p, "hr_scale", 2)))
            hr_h = int(getattr(p, "hr_upscale_to_y", 0) or 0) or int(self.height * float(getattr(p, "hr_scale", 2)))
            sizes.insert(0, (hr_w, hr_h))
        units = {plan.index: plan.unit for plan in self.plans}
        out = []
        for index, detected in self.detected_maps:
            for width, height in sizes:
                out.append((index, images.resize_to_target(detected, width, height, units[index].resize_mode)))
        return out

    # ------------------------------------------------------------------ hooking
    def begin_sampling(self, p, hires: bool = False) -> None:
        """(Re)hook the UNet for the coming pass (the first pass, or the hires-fix pass)."""
        from lib_controlnet.control import Controller
        from lib_controlnet.hosts import ldm as ldm_host

        self.end_sampling()
        prepared = self._prepare(p)
        controller = Controller(self._job, units=prepared)
        if hires:
            controller.set_pass(True, int(getattr(p, "hr_upscale_to_x", 0)) or None,
                                int(getattr(p, "hr_upscale_to_y", 0)) or None,
                                steps=int(getattr(p, "hr_second_pass_steps", 0) or p.steps))
        unet = p.sd_model.model.diffusion_model
        stack = contextlib.ExitStack()
        stack.enter_context(ldm_host.hooked(unet, controller))
        self._stack, self.controller = stack, controller

    def on_cfg_denoiser(self, params, p) -> None:
        if self.controller is None:
            return
        skip = False
        s_min_uncond = float(getattr(p, "s_min_uncond", 0) or 0)
        if s_min_uncond > 0 and params.sampling_step % 2 and params.sigma is not None:
            # the denoiser drops the unconditional rows on such steps, after this callback
            skip = float(params.sigma.flatten()[0]) < s_min_uncond
        self.controller.begin_step(params.sampling_step, params.total_sampling_steps, rows=_rows_for(params, skip))

    def end_sampling(self) -> None:
        stack, self._stack, self.controller = self._stack, None, None
        if stack is not None:
            stack.close()

    def close(self) -> None:
        self.end_sampling()
        self._prepared = None

    @property
    def hooked(self) -> bool:
        return self._stack is not None


def _encodes_image(module: str) -> bool:
    """Whether the unit's preprocessor hands its image to an image encoder (IP-Adapter) instead of making a map."""
    from lib_controlnet import preprocess

    try:
        return preprocess.get_preprocessor(module).image_encoder is not None
    except preprocess.PreprocessorError:
        return False
