"""The Dataset tab (gradio 3.41): sources, options, a Build and a Cancel button, per-stage progress and a
preview gallery. It drives the same resumable job as `python -m lib_controlnet dataset build`, in a thread.

`build_dataset_tab()` adds its components to the Blocks context it is called in (the WebUI's own tab, or the
standalone app's). Progress streams from a generator, so the Blocks need `.queue()` (the WebUI and the standalone
app turn it on); Refresh shows the same progress on demand, e.g. after reloading the page during a build.
Bad input and failed builds end in the Progress box as one sentence, never as an exception.
"""
from __future__ import annotations

import json
import time

from lib_controlnet.dataset.config import CAPTION_MODES, MODALITIES, RESIZE_MODES, BuildConfig
from lib_controlnet.dataset.runner import BackgroundBuild
from lib_controlnet.errors import UserError

FIELDS = (  # order of the values the Build button sends
    "out_dir", "knn_url", "prompts", "template", "template_values", "example_images", "num_images", "indice_name",
    "modality", "aesthetic_score", "aesthetic_weight", "deduplicate", "use_safety_model", "use_violence_detector",
    "url_list", "url_col", "caption_col", "include_keywords", "exclude_keywords", "image_dir", "hf_dataset_dir",
    "max_samples", "image_size", "resize_mode", "min_image_size", "max_aspect_ratio", "retries", "timeout",
    "thread_count", "processes_count", "allow_private_urls", "caption_mode", "captioner_path", "module",
    "module_resolution", "threshold_a", "threshold_b",
)


def _lines(text) -> list:
    return [line.strip() for line in str(text or "").splitlines() if line.strip()]


def _words(text) -> list:
    return [word.strip() for word in str(text or "").split(",") if word.strip()]


def _number(name: str, value, kind):
    """A Number box's value; a cleared box arrives as None."""
    try:
        return kind(value)
    except (TypeError, ValueError):
        raise UserError(f"{name.replace('_', ' ').capitalize()} must be a number, not {value!r}.") from None


def config_from_values(values: dict) -> BuildConfig:
    """UI values (strings, floats, empty boxes) -> a validated BuildConfig."""
    data = dict(values)
    data["prompts"] = _lines(data.get("prompts"))
    data["example_images"] = _lines(data.get("example_images"))
    data["include_keywords"] = _words(data.get("include_keywords"))
    data["exclude_keywords"] = _words(data.get("exclude_keywords"))
    raw = str(data.get("template_values") or "").strip()
    try:
        data["template_values"] = json.loads(raw) if raw else {}
    except ValueError:
        raise UserError('Template values must be JSON, e.g. {"style": ["modern", "rustic"], "room": ["kitchen"]}.') from None
    for name in ("knn_url", "template", "url_list", "image_dir", "hf_dataset_dir", "captioner_path"):
        data[name] = str(data.get(name) or "").strip() or None
    for name in ("aesthetic_score", "max_samples", "module_resolution"):
        data[name] = _number(name, data[name], int) if data.get(name) not in (None, "", 0) else None
    for name in ("max_aspect_ratio", "threshold_a", "threshold_b"):
        data[name] = _number(name, data[name], float) if data.get(name) not in (None, "", 0) else None
    for name in ("num_images", "image_size", "min_image_size", "retries", "thread_count", "processes_count"):
        data[name] = _number(name, data.get(name), int)
    for name in ("aesthetic_weight", "timeout"):
        data[name] = _number(name, data.get(name), float)
    config = BuildConfig.from_dict(data)
    config.require_runnable()
    return config


def preview_images(out_dir: str, limit: int = 16) -> list:
    from lib_controlnet.dataset.writer import preview_pairs

    items = []
    for image, conditioning in preview_pairs(out_dir)[:limit]:
        items += [(str(image), "image"), (str(conditioning), "conditioning")]
    return items


def _modules() -> list:
    try:
        from lib_controlnet.preprocess import list_modules

        return [m for m in list_modules() if m != "none"] or ["canny"]
    except ImportError:
        return ["canny"]


def build_dataset_tab(runner: BackgroundBuild | None = None):
    import gradio as gr

    runner = runner or BackgroundBuild()
    defaults = BuildConfig()
    c: dict = {}
    with gr.Column(elem_id="controlnet_dataset"):
        c["out_dir"] = gr.Textbox(label="Output folder", placeholder="/path/to/my-dataset", elem_id="cnds_out_dir")
        with gr.Accordion("Sources (any combination; merged, duplicates removed)", open=True):
            with gr.Tab("Retrieval (clip-retrieval backend or local index)"):
                c["knn_url"] = gr.Textbox(label="knn backend URL or local index folder",
                                          placeholder="http://host:1234 (clip-retrieval back) or /path/to/index "
                                                      "(python -m lib_controlnet dataset index build)")
                c["prompts"] = gr.Textbox(label="Prompts, one per line", lines=3)
                with gr.Row():
                    c["template"] = gr.Textbox(label="Prompt template", placeholder="{style} {room}, interior design")
                    c["template_values"] = gr.Textbox(label="Template values (JSON)",
                                                      placeholder='{"style": ["modern"], "room": ["kitchen"]}')
                c["example_images"] = gr.Textbox(label="Example images (paths or URLs, one per line)", lines=2)
                with gr.Row():
                    c["num_images"] = gr.Number(value=defaults.num_images, precision=0, label="Images per query")
                    c["indice_name"] = gr.Textbox(value=defaults.indice_name, label="Index name")
                    c["modality"] = gr.Radio(list(MODALITIES), value=defaults.modality, label="Search modality")
                with gr.Row():
                    c["aesthetic_score"] = gr.Number(value=0, precision=0, label="Aesthetic score (0: off)")
                    c["aesthetic_weight"] = gr.Number(value=defaults.aesthetic_weight, label="Aesthetic weight")
                    c["deduplicate"] = gr.Checkbox(value=True, label="Deduplicate")
                    c["use_safety_model"] = gr.Checkbox(value=True, label="Safety filter")
                    c["use_violence_detector"] = gr.Checkbox(value=True, label="Violence filter")
            with gr.Tab("URL list"):
                c["url_list"] = gr.Textbox(label="URL list file (.parquet, .csv, .jsonl)")
                with gr.Row():
                    c["url_col"] = gr.Textbox(value="url", label="URL column")
                    c["caption_col"] = gr.Textbox(value="caption", label="Caption column")
                with gr.Row():
                    c["include_keywords"] = gr.Textbox(label="Caption must contain one of (comma-separated)")
                    c["exclude_keywords"] = gr.Textbox(label="Caption must not contain (comma-separated)")
            with gr.Tab("Local"):
                c["image_dir"] = gr.Textbox(label="Image folder (captions from .txt files beside the images)")
                c["hf_dataset_dir"] = gr.Textbox(label="Hugging Face dataset folder (save_to_disk)")
            c["max_samples"] = gr.Number(value=0, precision=0, label="At most this many candidates (0: all)")
        with gr.Accordion("Options", open=False):
            with gr.Row():
                c["image_size"] = gr.Number(value=defaults.image_size, precision=0, label="Image size")
                c["resize_mode"] = gr.Dropdown(list(RESIZE_MODES), value=defaults.resize_mode, label="Resize mode")
                c["min_image_size"] = gr.Number(value=0, precision=0, label="Min image size")
                c["max_aspect_ratio"] = gr.Number(value=0, label="Max aspect ratio (0: any)")
            with gr.Row():
                c["retries"] = gr.Number(value=defaults.retries, precision=0, label="Retries")
                c["timeout"] = gr.Number(value=defaults.timeout, label="Timeout (s)")
                c["thread_count"] = gr.Number(value=defaults.thread_count, precision=0, label="Download threads")
                c["processes_count"] = gr.Number(value=1, precision=0, label="Download processes")
                c["allow_private_urls"] = gr.Checkbox(value=False, label="Allow private/loopback image URLs")
            with gr.Row():
                c["caption_mode"] = gr.Radio(list(CAPTION_MODES), value="source", label="Captions")
                c["captioner_path"] = gr.Textbox(label="Local BLIP captioner folder (for blip / both)")
            with gr.Row():
                c["module"] = gr.Dropdown(_modules(), value="canny", label="Preprocessor (conditioning image)")
                c["module_resolution"] = gr.Number(value=0, precision=0, label="Preprocessor resolution (0: image size)")
                c["threshold_a"] = gr.Number(value=0, label="Threshold A (0: default)")
                c["threshold_b"] = gr.Number(value=0, label="Threshold B (0: default)")
        with gr.Row():
            build = gr.Button("Build dataset", variant="primary", elem_id="cnds_build")
            cancel = gr.Button("Cancel", elem_id="cnds_cancel")
            refresh = gr.Button("Refresh progress", elem_id="cnds_refresh")
        status = gr.Textbox(label="Progress", lines=7, interactive=False, elem_id="cnds_status")
        gallery = gr.Gallery(label="Preview (image, conditioning)", columns=4, elem_id="cnds_gallery")
    for name, component in c.items():  # every field gets a stable id, for user CSS and the browser tests
        component.elem_id = component.elem_id or f"cnds_{name}"

    def on_build(*values):
        try:
            config = config_from_values(dict(zip(FIELDS, values)))
            runner.start(config)
        except UserError as error:
            yield f"error: {error}", []
            return
        while runner.running:
            yield runner.status_text(), preview_images(config.out_dir)
            time.sleep(0.5)
        yield runner.status_text(), preview_images(config.out_dir)

    def on_cancel():
        runner.cancel()
        return runner.status_text()

    def on_refresh(out_dir):
        return runner.status_text(), preview_images(runner.config.out_dir if runner.config else out_dir)

    # The build streams (queued, a progress timer only: the boxes stay readable); Cancel and Refresh skip the
    # queue so they answer at once whatever the queue holds.
    build.click(on_build, [c[name] for name in FIELDS], [status, gallery], show_progress="minimal")
    cancel.click(on_cancel, None, [status], queue=False)
    refresh.click(on_refresh, [c["out_dir"]], [status, gallery], queue=False)
    return {"components": c, "build": build, "cancel": cancel, "status": status, "gallery": gallery,
            "runner": runner, "on_build": on_build, "on_cancel": on_cancel, "on_refresh": on_refresh}
