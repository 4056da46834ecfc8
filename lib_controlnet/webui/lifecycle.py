"""What the "ControlNet" script does at each point of a WebUI job; scripts/controlnet.py delegates here.

Args reach every hook as the WebUI passes them: the panel's flat component values, or, from the API's
`alwayson_scripts.ControlNet.args`, unit dicts at the front of the same list (see ui/unit_args.py).
"""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from lib_controlnet import api
from lib_controlnet.settings import get_settings
from lib_controlnet.ui import unit_args
from lib_controlnet.unit import ControlUnitError
from lib_controlnet.webui import base_fit, infotext, settings
from lib_controlnet.ui.batch_folder import folder_images
from lib_controlnet.webui.job import UnitPlan, WebUIJob


TITLE = "ControlNet"
JOB_ATTRIBUTE = "controlnet_studio_job"  # where the running job lives on `p`
SIZE_ELEM_IDS = {"txt2img_width", "txt2img_height", "img2img_width", "img2img_height"}


def _job(p) -> WebUIJob | None:
    return getattr(p, JOB_ATTRIBUTE, None)


class Lifecycle:
    def __init__(self):
        self.size_components: dict[str, object] = {}
        self.panels: dict[bool, object] = {}

    # ------------------------------------------------------------------ UI
    def after_component(self, component, elem_id) -> None:
        if elem_id in SIZE_ELEM_IDS:
            self.size_components[elem_id] = component

    def ui(self, script, is_img2img: bool) -> list:
        from lib_controlnet.ui.control_panel import PanelOptions, build_control_panel

        settings.sync()
        tab = "img2img" if is_img2img else "txt2img"
        panel = build_control_panel(PanelOptions(
            is_img2img=is_img2img, unit_count=get_settings().unit_count, elem_prefix=f"{tab}_controlnet",
            width=self.size_components.get(f"{tab}_width"), height=self.size_components.get(f"{tab}_height")))
        self.panels[is_img2img] = panel
        script.infotext_fields = panel.infotext_fields()
        script.paste_field_names = [key for _, key in script.infotext_fields]
        return panel.inputs()

    # ------------------------------------------------------------------ a job
    def _plans(self, p, args) -> list[UnitPlan]:
        try:
            units = unit_args.units_from_args(args)
        except ControlUnitError as error:
            raise api.PayloadError(f"ControlNet unit {error.field}", error.message) from None
        init_images = getattr(p, "init_images", None) or []
        plans = []
        for index, panel_unit in enumerate(units):
            unit = panel_unit.unit
            if not unit.is_active:
                continue
            batch_images = batch_masks = None
            if unit.batch_image_dir:
                batch_images = folder_images(unit.batch_image_dir, "batch input")
                if unit.batch_mask_dir:
                    batch_masks = folder_images(unit.batch_mask_dir, "batch mask")
            elif (unit.image is None or not panel_unit.independent_image) and init_images:
                # img2img: the unit follows the img2img input unless it has (and wants) its own image
                unit = unit.replace(image=np.asarray(init_images[0].convert("RGB")))
            api.validate_unit(unit, f"ControlNet unit {index}")
            sentence = base_fit.mismatch(unit.model, base_fit.loaded_family()) if unit.uses_model else None
            if sentence:
                raise api.PayloadError(f"ControlNet unit {index}.model", sentence)
            plans.append(UnitPlan(index, unit, batch_images, batch_masks))
        return plans

    def process(self, p, *args) -> None:
        self._finish(p)  # a previous job on this p that never reached postprocess
        settings.sync()
        plans = self._plans(p, args)
        if not plans:
            return
        for plan in plans:
            text = infotext.write(plan.unit)
            if text:
                p.extra_generation_params[infotext.key(plan.index)] = text
        job = WebUIJob(plans, p)
        setattr(p, JOB_ATTRIBUTE, job)
        _ACTIVE[id(job)] = (job, p)
        _chain_close(p, lambda: self._finish(p))

    def before_sampling(self, p, hires: bool = False) -> None:
        """Hook the UNet for the coming sampling pass. Called from process_batch (every WebUI version), from
        before_hr (hires pass) and from process_before_every_sampling where the WebUI has it; hooking again
        for the same pass only replaces the hooks."""
        job = _job(p)
        if job is not None:
            job.begin_sampling(p, hires=hires or bool(getattr(p, "is_hr_pass", False)))

    def on_cfg_denoiser(self, params) -> None:
        p = getattr(getattr(params, "denoiser", None), "p", None)
        for job, owner in _active_jobs(p):
            job.on_cfg_denoiser(params, owner)

    def postprocess(self, p, processed, *args) -> None:
        job = _job(p)
        if job is None:
            return
        self._finish(p)
        self._show_and_save_maps(p, processed, job)

    def _finish(self, p) -> None:
        job = _job(p)
        if job is not None:
            job.close()
            _ACTIVE.pop(id(job), None)

    def _show_and_save_maps(self, p, processed, job: WebUIJob) -> None:
        from PIL import Image

        cfg = get_settings()
        wanted = {plan.index: plan.unit for plan in job.plans}
        folder = Path(cfg.detected_maps_dir)
        number = _next_file_number(folder) if cfg.save_detected_maps else 0
        for n, (index, detected) in enumerate(job.output_maps(p)):
            unit = wanted.get(index)
            if unit is None:
                continue
            image = Image.fromarray(detected)
            if unit.save_detected_map:
                processed.images.append(image)
                processed.infotexts.append(processed.infotexts[0] if processed.infotexts else "")
            if cfg.save_detected_maps:
                folder.mkdir(parents=True, exist_ok=True)
                seed = getattr(processed, "seed", 0)
                image.save(folder / f"{number + n:05d}-{seed}-unit{index}-{unit.module.split(' ')[0]}.png")


def _next_file_number(folder: Path) -> int:
    """The WebUI's own numbering ("00012-<seed>-unit0-canny.png"), so maps of jobs with the same seed never
    overwrite; files named any other way (older versions, the user's own) do not count."""
    numbers = [int(m.group(1)) for p in (folder.glob("*.png") if folder.is_dir() else [])
               if (m := _MAP_NAME.match(p.name))]
    return max(numbers, default=-1) + 1


_MAP_NAME = re.compile(r"(\d+)-\d+-unit\d+-")


# Jobs whose UNet is hooked, so that the global on_cfg_denoiser callback can find them.
_ACTIVE: dict[int, tuple] = {}


def _active_jobs(p):
    if p is not None and _job(p) is not None:
        return [(_job(p), p)]
    return list(_ACTIVE.values())


def _chain_close(p, cleanup) -> None:
    """Run `cleanup` when the WebUI closes `p` (it always does, in a finally, also after an exception)."""
    original = p.close

    def close(*a, **kw):
        try:
            cleanup()
        finally:
            p.close = original
            original(*a, **kw)

    p.close = close
