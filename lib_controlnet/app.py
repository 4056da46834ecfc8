"""The standalone app: the ControlNet panel with generation on diffusers, the Dataset and Train tabs, and the
same HTTP routes as inside the WebUI (plus `/sdapi/v1/txt2img`), on one FastAPI server."""
from __future__ import annotations

import dataclasses
import random
import sys
import threading
import traceback
from pathlib import Path
from typing import Optional

import gradio as gr
from fastapi import FastAPI

from lib_controlnet import api
from lib_controlnet.errors import UserError
from lib_controlnet.settings import EXTENSION_ROOT, get_settings
from lib_controlnet.ui.batch_folder import folder_images, pick
from lib_controlnet.ui.control_panel import PanelOptions, build_control_panel
from lib_controlnet.ui.unit_args import units_from_args
from lib_controlnet.unit import ControlUnitError


JAVASCRIPT_DIR = EXTENSION_ROOT / "javascript"
STYLE_FILE = EXTENSION_ROOT / "style.css"
QUEUE_WORKERS = 8


class NoBaseModelError(UserError):
    pass


@dataclasses.dataclass
class AppOptions:
    base: Optional[Path] = None  # a diffusers folder or a single-file SD checkpoint
    unit_count: Optional[int] = None  # None: the setting


class StandaloneGenerator:
    """Runs GenerationJobs on the diffusers host (lib_controlnet.generate), one at a time, with the base
    loaded once."""

    def __init__(self, base: Optional[Path]):
        self.base = Path(base) if base else None
        self._pipe = None
        self._lock = threading.Lock()  # one job at a time: hooks go on the one shared UNet

    def __call__(self, job: api.GenerationJob) -> api.GenerationOutput:
        from lib_controlnet import base_model, generate

        if self.base is None:
            raise NoBaseModelError("No base model: start the server with --base PATH (a diffusers folder or an "
                                   "SD checkpoint).")
        seed = job.seed if job.seed is not None and job.seed >= 0 else random.randrange(2**32)
        request = generate.GenerateRequest(
            base=str(self.base), prompt=job.prompt, units=list(job.units), negative_prompt=job.negative_prompt,
            steps=job.steps, width=job.width, height=job.height, seed=seed, guidance_scale=job.cfg_scale,
            batch_size=job.batch_size)
        with self._lock:
            if self._pipe is None:
                self._pipe = base_model.load_pipeline(self.base)
            result = generate.generate(request, pipe=self._pipe)
        maps = [result.detected[key] for key in sorted(result.detected, key=_map_order)
                if _wants_map(job.units, key)]
        return api.GenerationOutput(images=list(result.images), detected_maps=maps,
                                    infotexts=[result.infotext] * len(result.images), seed=seed)


def _map_order(key: str) -> tuple:
    return tuple(int(part) for part in key.split("-"))


def _wants_map(units: list, key: str) -> bool:
    index = _map_order(key)[0]
    return index >= len(units) or units[index].save_detected_map


def batch_jobs(units: list) -> list[list]:
    """The units of each generation: one job, or one per image when a unit takes its images from a folder."""
    folders = {}
    for i, unit in enumerate(units):
        if unit.is_active and unit.batch_image_dir:
            masks = folder_images(unit.batch_mask_dir, "batch mask") if unit.batch_mask_dir else None
            folders[i] = (folder_images(unit.batch_image_dir, "batch input"), masks)
    if not folders:
        return [units]
    count = max(len(images) for images, _ in folders.values())
    jobs = []
    for k in range(count):
        job_units = list(units)
        for i, (images, masks) in folders.items():
            image = pick(images, k, 1)[0]
            mask = pick(masks, k, 1)[0] if masks else None
            job_units[i] = units[i].replace(image=image, mask=mask)
        jobs.append(job_units)
    return jobs


class _UserErrorsInOneLine:
    """Stands in for the `traceback` module inside gradio.routes. gradio 3.41 prints a full traceback for every
    gr.Error a handler raises, although gr.Error carries the sentence a user is meant to read (a bad setting, a
    missing model), not a crash. The standalone server owns its process, so it logs those as one line; every other
    exception keeps its traceback."""

    def __init__(self, module):
        self._module = module

    def __getattr__(self, name):
        return getattr(self._module, name)

    def print_exc(self, *args, **kwargs):
        error = sys.exc_info()[1]
        if isinstance(error, gr.Error):
            print(f"ControlNet Studio: {error.message}", file=sys.stderr, flush=True)
            return
        self._module.print_exc(*args, **kwargs)


def _log_user_errors_in_one_line() -> None:
    from gradio import routes

    if isinstance(getattr(routes, "traceback", None), type(traceback)):  # a gradio that prints this way
        routes.traceback = _UserErrorsInOneLine(routes.traceback)


def _javascript() -> str:
    # The WebUI loads javascript/*.js itself; here gradio runs them once the page is up.
    parts = [p.read_text(encoding="utf-8") for p in sorted(JAVASCRIPT_DIR.glob("*.js"))]
    return "() => {\n" + "\n".join(parts) + "\n}"


def _mount_optional_tab(title: str, module: str, builder: str, **kwargs) -> None:
    with gr.Tab(title, elem_id=f"tab_{title.lower()}"):
        try:
            build = getattr(__import__(module, fromlist=[builder]), builder)
        except (ImportError, AttributeError) as error:
            gr.Markdown(f"The {title} tab is not available in this build ({error}).")
            return
        build(**kwargs)


def build_blocks(generator: StandaloneGenerator, unit_count: int) -> gr.Blocks:
    css = STYLE_FILE.read_text(encoding="utf-8") if STYLE_FILE.exists() else None
    with gr.Blocks(title="ControlNet Studio", css=css, analytics_enabled=False) as demo:
        with gr.Tabs(elem_id="tabs"):
            with gr.Tab("txt2img", elem_id="tab_txt2img"):
                with gr.Row():
                    with gr.Column(scale=3):
                        prompt = gr.Textbox(label="Prompt", lines=2, elem_id="txt2img_prompt")
                        negative = gr.Textbox(label="Negative prompt", lines=1, elem_id="txt2img_neg_prompt")
                        with gr.Row():
                            width = gr.Slider(64, 2048, value=512, step=8, label="Width", elem_id="txt2img_width")
                            height = gr.Slider(64, 2048, value=512, step=8, label="Height",
                                               elem_id="txt2img_height")
                        with gr.Row():
                            steps = gr.Slider(1, 150, value=20, step=1, label="Sampling steps",
                                              elem_id="txt2img_steps")
                            cfg = gr.Slider(1, 30, value=7.5, step=0.5, label="CFG Scale", elem_id="txt2img_cfg_scale")
                            seed = gr.Number(value=-1, precision=0, label="Seed", elem_id="txt2img_seed")
                        panel = build_control_panel(PanelOptions(
                            is_img2img=False, unit_count=unit_count, elem_prefix="txt2img_controlnet",
                            width=width, height=height, open=True))
                    with gr.Column(scale=2):
                        run_button = gr.Button("Generate", variant="primary", elem_id="txt2img_generate")
                        gallery = gr.Gallery(label="Output", elem_id="txt2img_gallery", columns=2)
                        info = gr.Textbox(label="Generation parameters", interactive=False, lines=4,
                                          elem_id="txt2img_info")
            _mount_optional_tab("Dataset", "lib_controlnet.ui.dataset_tab", "build_dataset_tab")
            _mount_optional_tab("Train", "lib_controlnet.ui.train_tab", "build_train_tab",
                                default_base=str(generator.base) if generator.base else "")

        def on_generate(prompt_text, negative_text, w, h, n_steps, cfg_scale, seed_value, *panel_values):
            try:
                units = [pu.unit for pu in units_from_args(panel_values)]
                for i, unit in enumerate(units):
                    if unit.is_active:
                        api.validate_unit(unit, f"ControlNet unit {i}")
                gallery_items, infotexts = [], []
                for job_units in batch_jobs(units):  # batch mode: one generation per folder image
                    job = api.GenerationJob(prompt=prompt_text, negative_prompt=negative_text, steps=int(n_steps),
                                            width=int(w), height=int(h),
                                            seed=-1 if seed_value is None else int(seed_value),  # cleared box
                                            cfg_scale=float(cfg_scale), units=job_units)
                    output = generator(job)
                    gallery_items += list(output.images) + list(output.detected_maps)
                    infotexts += output.infotexts[:1]
            except (UserError, ControlUnitError) as error:
                raise gr.Error(str(error)) from None
            return gallery_items, "\n\n".join(infotexts)

        run_button.click(on_generate, [prompt, negative, width, height, steps, cfg, seed] + panel.inputs(),
                         [gallery, info])
        demo.load(None, None, None, _js=_javascript())
    # The Dataset and Train tabs stream progress from generators, which gradio 3.41 runs only through its queue
    # (the WebUI turns it on for its own Blocks). Several workers: a build or a training run holds one for as
    # long as it streams, and generation, previews and the other tab must not wait behind it.
    demo.queue(concurrency_count=QUEUE_WORKERS)
    return demo


def create_app(options: AppOptions) -> FastAPI:
    unit_count = options.unit_count or get_settings().unit_count
    generator = StandaloneGenerator(options.base)
    app = FastAPI(title="ControlNet Studio")
    api.register_routes(app)
    api.register_generation_routes(app, generator)
    demo = build_blocks(generator, unit_count)
    _log_user_errors_in_one_line()
    return gr.mount_gradio_app(app, demo, path="/")
