"""The Train tab (gradio 3.41): dataset folder, base model, options, Start / Cancel, a live plot of the training
metrics, a progress bar with ETA, the validation gallery and the exported file. The run is `lib_controlnet.train`
in a background thread (`BackgroundTraining`); the tab polls it from a generator, so the Blocks need `.queue()`.

The plot draws every series in `BackgroundTraining.series`: the loss of each step and every name the trainer puts
in `Progress.metrics` (e.g. a validation score), one coloured line per name, with no change here.

`build_train_tab()` adds its components to the Blocks context it is called in.
"""
from __future__ import annotations

import html
import time

from lib_controlnet.errors import UserError
from lib_controlnet.train.config import CONTROLNET_SIZES, CROPS, PRECISIONS, PREDICTION_TYPES, SCHEDULERS, TrainConfig
from lib_controlnet.train.runner import BackgroundTraining

FIELDS = (  # order of the values the Start button sends; names are TrainConfig fields
    "dataset", "base", "base_config", "controlnet", "output_dir", "resolution", "max_train_steps", "num_train_epochs",
    "train_batch_size", "gradient_accumulation_steps", "learning_rate", "lr_scheduler", "lr_warmup_steps", "seed",
    "mixed_precision", "gradient_checkpointing", "use_8bit_adam", "sd_locked", "cache_latents",
    "cache_text_embeddings", "proportion_empty_prompts", "crop", "random_flip", "aspect_buckets", "prediction_type",
    "image_column", "conditioning_image_column", "caption_column", "checkpointing_steps", "checkpoints_total_limit",
    "resume_from", "validation_prompts", "validation_images", "validation_steps", "export_dir", "export_name",
    "export_dtype", "export_diffusers", "controlnet_size", "vae",
)
LIST_FIELDS = ("validation_prompts", "validation_images")


def config_from_values(values: dict) -> TrainConfig:
    """UI values (numbers as floats, empty boxes, multi-line text) -> a validated TrainConfig."""
    data = {}
    for name, value in values.items():
        if name in LIST_FIELDS:
            value = [line.strip() for line in str(value or "").splitlines() if line.strip()]
        elif name == "max_train_steps":
            value = int(value) if value not in (None, "", 0) else None  # 0 / empty: train by epochs
        elif isinstance(value, str):
            value = value.strip()
        data[name] = value
    return TrainConfig.from_dict(data)


def progress_html(fraction: float, eta_s: float | None) -> str:
    percent = max(0.0, min(1.0, fraction)) * 100
    eta = f" - ETA {eta_s:.0f}s" if eta_s else ""
    return (f'<div class="cnst-progress" style="border:1px solid #888;border-radius:4px;height:18px;">'
            f'<div style="width:{percent:.1f}%;height:100%;background:#4a90d9;"></div></div>'
            f"<span>{percent:.0f}%{html.escape(eta)}</span>")


POLL_S = 0.5  # how often the page gets the run's state


def metrics_frame(series: dict):
    """{name: {step: value}} -> the long table the plot reads: one row per (step, value, metric)."""
    import pandas as pd

    rows = [(int(step), float(value), str(name))
            for name, points in list(series.items()) for step, value in sorted(dict(points).items())]
    if not rows:
        return None  # an empty plot (altair cannot tell the column types of an empty table)
    return pd.DataFrame(rows, columns=["step", "value", "metric"])


def gallery_items(validation: list) -> list:
    items = []
    for step, images in validation[-4:]:
        items += [(str(path), f"step {step}: {prompt}") for prompt, _, path in images]
    return items


def exported_text(runner: BackgroundTraining) -> str:
    result = runner.result
    if result is None:
        return ""
    return "\n".join(str(p) for p in (result.exported, result.exported_diffusers, result.report) if p)


def build_train_tab(runner: BackgroundTraining | None = None, loaded_checkpoint=None, default_base: str = ""):
    """`loaded_checkpoint`: () -> path of the checkpoint the WebUI has loaded; with it, the tab offers that model as
    the base, and `runner.base_provider` loads it with the UNet weights the WebUI holds in memory.
    `default_base`: what the Base model box starts with (the standalone app's `serve --base`)."""
    import gradio as gr

    runner = runner or BackgroundTraining()
    d = TrainConfig()
    c: dict = {}
    with gr.Column(elem_id="controlnet_train"):
        with gr.Row():
            c["dataset"] = gr.Textbox(label="Dataset folder (Dataset tab output, save_to_disk, or images/ + "
                                            "conditioning/)", elem_id="cntr_dataset")
            with gr.Column():
                use_loaded = gr.Checkbox(value=loaded_checkpoint is not None, visible=loaded_checkpoint is not None,
                                         label="Base: the WebUI's loaded checkpoint", elem_id="cntr_use_loaded")
                c["base"] = gr.Textbox(value=default_base or "", label="Base model (diffusers folder or SD "
                                       "checkpoint file)", elem_id="cntr_base")
        with gr.Row():
            c["output_dir"] = gr.Textbox(value=d.output_dir, label="Training folder (checkpoints, report)",
                                         elem_id="cntr_output_dir")
            c["resume_from"] = gr.Textbox(label="Resume from ('latest' or a checkpoint folder; empty: fresh)")
        with gr.Accordion("Training", open=True):
            with gr.Row():
                c["resolution"] = gr.Number(value=d.resolution, precision=0, label="Resolution")
                c["max_train_steps"] = gr.Number(value=1000, precision=0, label="Steps (0: use epochs)")
                c["num_train_epochs"] = gr.Number(value=d.num_train_epochs, precision=0, label="Epochs")
                c["train_batch_size"] = gr.Number(value=d.train_batch_size, precision=0, label="Batch size")
                c["gradient_accumulation_steps"] = gr.Number(value=1, precision=0, label="Gradient accumulation")
            with gr.Row():
                c["learning_rate"] = gr.Number(value=d.learning_rate, label="Learning rate")
                c["lr_scheduler"] = gr.Dropdown(list(SCHEDULERS), value=d.lr_scheduler, label="LR scheduler")
                c["lr_warmup_steps"] = gr.Number(value=0, precision=0, label="Warm-up steps")
                c["seed"] = gr.Number(value=0, precision=0, label="Seed")
                c["mixed_precision"] = gr.Dropdown(list(PRECISIONS), value="no", label="Mixed precision")
            with gr.Row():
                c["gradient_checkpointing"] = gr.Checkbox(value=False, label="Gradient checkpointing")
                c["use_8bit_adam"] = gr.Checkbox(value=False, label="8-bit Adam (bitsandbytes)")
                c["sd_locked"] = gr.Checkbox(value=True, label="sd_locked (UNet frozen)")
                c["cache_latents"] = gr.Checkbox(value=False, label="Cache VAE latents")
                c["cache_text_embeddings"] = gr.Checkbox(value=False, label="Cache text embeddings")
        with gr.Accordion("Data and model options", open=False):
            with gr.Row():
                c["proportion_empty_prompts"] = gr.Slider(0, 1, value=0, step=0.05, label="Empty prompt proportion")
                c["crop"] = gr.Radio(list(CROPS), value=d.crop, label="Crop")
                c["random_flip"] = gr.Checkbox(value=False, label="Random flip")
                c["aspect_buckets"] = gr.Checkbox(value=False, label="Aspect-ratio buckets")
            with gr.Row():
                c["image_column"] = gr.Textbox(value=d.image_column, label="Image column")
                c["conditioning_image_column"] = gr.Textbox(value=d.conditioning_image_column,
                                                            label="Conditioning image column")
                c["caption_column"] = gr.Textbox(value=d.caption_column, label="Caption column")
            with gr.Row():
                c["base_config"] = gr.Textbox(label="Base config folder (for a single-file base)")
                c["controlnet"] = gr.Textbox(label="Fine-tune this ControlNet (empty: start from the UNet)")
                c["prediction_type"] = gr.Dropdown(list(PREDICTION_TYPES), value="auto", label="Prediction type")
            with gr.Row():  # the architecture (SD1.x / SD2.x / SDXL) comes from the base itself
                c["controlnet_size"] = gr.Dropdown(list(CONTROLNET_SIZES), value=d.controlnet_size,
                                                   label="New ControlNet size (full copy of the UNet encoder, or "
                                                         "mid / small as the released SDXL ones)")
                c["vae"] = gr.Textbox(label="VAE file, fp16-safe (e.g. sdxl-vae-fp16-fix; empty: the base's own, "
                                            "SDXL's kept in fp32)")
        with gr.Accordion("Checkpoints, validation, export", open=False):
            with gr.Row():
                c["checkpointing_steps"] = gr.Number(value=d.checkpointing_steps, precision=0,
                                                     label="Checkpoint every N steps")
                c["checkpoints_total_limit"] = gr.Number(value=d.checkpoints_total_limit, precision=0,
                                                         label="Keep last K checkpoints")
                c["validation_steps"] = gr.Number(value=100, precision=0, label="Validate every N steps")
            with gr.Row():
                c["validation_prompts"] = gr.Textbox(label="Validation prompts (one per line)", lines=2)
                c["validation_images"] = gr.Textbox(label="Validation conditioning images (paths, one per line)",
                                                    lines=2)
            with gr.Row():
                c["export_dir"] = gr.Textbox(label="Export folder (empty: the ControlNet models folder)")
                c["export_name"] = gr.Textbox(label="File name (empty: automatic)")
                c["export_dtype"] = gr.Radio(["fp16", "fp32"], value="fp16", label="Export precision")
                c["export_diffusers"] = gr.Checkbox(value=False, label="Also a diffusers folder")
        with gr.Row():
            start = gr.Button("Start training", variant="primary", elem_id="cntr_start")
            cancel = gr.Button("Cancel", elem_id="cntr_cancel")
        bar = gr.HTML(progress_html(0, None), elem_id="cntr_progress")
        status = gr.Textbox(label="Status", lines=6, interactive=False, elem_id="cntr_status")
        curve = gr.LinePlot(metrics_frame({}), x="step", y="value", color="metric", title="Training metrics",
                            tooltip=["metric", "step", "value"], width=500, height=250, elem_id="cntr_loss")
        gallery = gr.Gallery(label="Validation images", columns=4, elem_id="cntr_gallery")
        exported = gr.Textbox(label="Exported files", interactive=False, elem_id="cntr_exported")
    for name, component in c.items():  # every field gets a stable id, for user CSS and the browser tests
        component.elem_id = component.elem_id or f"cntr_{name}"

    def snapshot():
        eta = runner.progress.eta_s if runner.progress else None
        return (progress_html(runner.fraction(), eta), runner.status_text(), metrics_frame(runner.series),
                gallery_items(runner.validation), exported_text(runner))

    def on_start(use_loaded_checkpoint, *values):
        try:
            config = config_from_values(dict(zip(FIELDS, values)))
            from_webui = bool(use_loaded_checkpoint and loaded_checkpoint is not None)
            if from_webui:
                config.base = loaded_checkpoint()
            runner.start(config, use_base_provider=from_webui)
        except UserError as error:  # bad settings, a run already going: one sentence in the status box
            yield progress_html(0, None), f"error: {error}", metrics_frame({}), [], ""
            return
        while runner.running:
            yield snapshot()
            time.sleep(POLL_S)
        yield snapshot()

    def on_cancel():
        if not runner.running:
            return runner.status_text() or "No training run is going."
        runner.cancel()
        return "cancelling: the run stops after this step and saves a checkpoint"

    # Start streams through the queue (a progress timer only, so the plot and boxes stay readable); Cancel skips
    # the queue so it answers at once whatever the queue holds.
    start.click(on_start, [use_loaded] + [c[name] for name in FIELDS], [bar, status, curve, gallery, exported],
                show_progress="minimal")
    cancel.click(on_cancel, None, [status], queue=False)
    return {"components": c, "use_loaded": use_loaded, "start": start, "cancel": cancel, "status": status, "curve": curve, "gallery": gallery,
            "exported": exported, "progress": bar, "runner": runner, "on_start": on_start, "on_cancel": on_cancel}
