"""The ControlNet panel (gradio 3.41): one tab per unit, the same in the WebUI and the standalone app.

`build_control_panel` must be called inside an open gr.Blocks context. It returns the components in the order
of `unit_args.UNIT_FIELDS` per unit; the host passes their values back to `unit_args.units_from_args`.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Optional

import gradio as gr

from lib_controlnet.errors import UserError
from lib_controlnet.ui import catalog
from lib_controlnet.ui.unit_args import UNIT_FIELDS, sketch_to_image_and_mask
from lib_controlnet.unit import ControlMode, ControlUnit, HiResFixOption, ResizeMode, UnionControlType

REFRESH_SYMBOL = "\U0001f504"  # the WebUI's own refresh glyph
DIMENSIONS_SYMBOL = "\U0001f4d0"


@dataclasses.dataclass
class PanelOptions:
    is_img2img: bool = False
    unit_count: int = 3
    elem_prefix: str = "controlnet"
    width: Optional[gr.components.Component] = None  # the host's generation size, for "send dimensions"
    height: Optional[gr.components.Component] = None
    open: bool = False


@dataclasses.dataclass
class UnitControls:
    index: int
    components: dict  # UNIT_FIELDS name -> component
    preview: gr.Image = None
    refresh: gr.Button = None

    def ordered(self) -> list:
        return [self.components[name] for name in UNIT_FIELDS]


@dataclasses.dataclass
class ControlPanel:
    units: list

    def inputs(self) -> list:
        return [c for unit in self.units for c in unit.ordered()]

    def infotext_fields(self) -> list:
        """(component, params key) pairs; keys are those webui.infotext adds when parameters are pasted."""
        pairs = []
        for unit in self.units:
            for name in UNIT_FIELDS:
                if name not in ("image", "batch_image_dir", "batch_mask_dir", "independent_image", "multi_images"):
                    pairs.append((unit.components[name], paste_key(unit.index, name)))
        return pairs


def paste_key(index: int, field: str) -> str:
    return f"ControlNet {index} {field}"


def _slider_update(slider: dict | None, *, keep_value=None):
    if slider is None:
        return gr.update(visible=False, value=-1, minimum=-1)
    value = slider.get("value", slider.get("min", 0))
    if keep_value is not None and keep_value != -1:
        value = keep_value
    return gr.update(visible=True, label=slider.get("name", ""), minimum=slider.get("min", 0),
                     maximum=slider.get("max", 1), step=slider.get("step", 1), value=value, interactive=True)


def on_module_change(module: str, pixel_perfect: bool):
    """Resolution and threshold sliders take the module's own labels, ranges and defaults."""
    try:
        layout = catalog.slider_layout(module)
    except UserError as error:
        raise gr.Error(str(error)) from None
    resolution = _slider_update(layout.resolution)
    if layout.resolution is not None and pixel_perfect:
        resolution["visible"] = False  # pixel-perfect picks the resolution from the generation size
    return resolution, _slider_update(layout.threshold_a), _slider_update(layout.threshold_b)


def on_module_multi_inputs(module: str):
    """The Multi-Inputs upload shows for preprocessors that feed an image prompt (they name an image encoder),
    the note saying so otherwise; hiding it drops its files, so a unit switched to another preprocessor never
    runs on images it no longer shows."""
    try:
        prompts = catalog.get_preprocessor(module).image_encoder is not None
    except Exception:  # an unknown module name: no image prompt
        prompts = False
    upload = gr.update(visible=True) if prompts else gr.update(visible=False, value=None)
    return upload, gr.update(visible=not prompts)


def on_control_type_change(control_type: str, module: str, model: str):
    """Offer the type's preprocessors and models; keep the current choices when the type offers them (so
    pasted parameters, which set type, module and model together, survive this event)."""
    types = catalog.control_types()
    entry = types.get(control_type) or types[catalog.ALL_TYPES]
    models = catalog.panel_model_choices(types, control_type)
    keep_module = module in entry["module_list"] and module != catalog.NO_MODULE
    keep_model = model in models and model != catalog.NO_MODEL
    return (gr.update(choices=entry["module_list"], value=module if keep_module else entry["default_option"]),
            gr.update(choices=models, value=model if keep_model else entry["default_model"]))


def refresh_models(*types_and_models):
    """Rescan the model folders and update every unit's Model dropdown (a file added shows up in all of them),
    each keeping its choice; arguments are (control type, model) per unit."""
    try:
        catalog.model_names(update=True)
        types = catalog.control_types()
    except UserError as error:
        raise gr.Error(str(error)) from None
    updates = []
    for control_type, current in zip(types_and_models[::2], types_and_models[1::2]):
        choices = catalog.panel_model_choices(types, control_type)
        kept = catalog.same_model(choices, current)
        updates.append(gr.update(choices=choices, value=kept if kept is not None else choices[0]))
    return updates[0] if len(updates) == 1 else updates


def run_preview(sketch, module, processor_res, threshold_a, threshold_b, pixel_perfect, resize_mode,
                width=512, height=512):
    from lib_controlnet import preprocess

    image, mask = sketch_to_image_and_mask(sketch)
    if image is None:
        raise gr.Error("Upload a control image first.")
    if not module or module == catalog.NO_MODULE:
        return image
    try:
        if pixel_perfect:
            processor_res = preprocess.pixel_perfect_resolution(
                image.shape[:2], int(width), int(height), ResizeMode.parse(resize_mode, "resize_mode"))
        resolution = int(processor_res) if processor_res and processor_res > 0 else 512
        detected = preprocess.run(module, image, resolution=resolution,
                                  threshold_a=None if threshold_a == -1 else threshold_a,
                                  threshold_b=None if threshold_b == -1 else threshold_b, mask=mask)
        return detected[..., :3]  # inpaint maps carry the mask as alpha: show the colours (LaMa's fill)
    except UserError as error:
        raise gr.Error(str(error)) from None


def send_dimensions(sketch):
    image, _ = sketch_to_image_and_mask(sketch)
    if image is None:
        return gr.update(), gr.update()
    h, w = image.shape[:2]
    return gr.update(value=int(round(w / 8) * 8)), gr.update(value=int(round(h / 8) * 8))


def _build_unit(index: int, options: PanelOptions, modules: list, models: list, types: list) -> UnitControls:
    default = ControlUnit(enabled=False)

    def eid(name: str) -> str:
        return f"{options.elem_prefix}_unit{index}_{name}"

    c: dict[str, Any] = {}
    with gr.Tabs(elem_id=eid("input_tabs")):
        with gr.Tab("Single image", elem_id=eid("single_tab")):
            with gr.Row():
                c["image"] = gr.Image(source="upload", tool="sketch", type="numpy", label="Control image",
                                      elem_id=eid("image"), elem_classes=["cnet-image"], brush_radius=20,
                                      visible=not options.is_img2img)
                preview = gr.Image(label="Detected map", interactive=False, elem_id=eid("preview"),
                                   elem_classes=["cnet-preview"])
        with gr.Tab("Batch", elem_id=eid("batch_tab")):
            c["batch_image_dir"] = gr.Textbox(label="Input directory", placeholder="Folder of control images",
                                              elem_id=eid("batch_image_dir"))
            c["batch_mask_dir"] = gr.Textbox(label="Mask directory (optional)", elem_id=eid("batch_mask_dir"))
        with gr.Tab("Multi-Inputs", elem_id=eid("multi_tab")):
            c["multi_images"] = gr.File(label="Images of one image prompt (averaged)", file_count="multiple",
                                        file_types=["image"], type="file", visible=False,
                                        elem_id=eid("multi_images"))
            multi_note = gr.Markdown("Several images on one unit are for image prompts: pick an IP-Adapter "
                                     "preprocessor to give them.", elem_id=eid("multi_note"))
    with gr.Row(elem_classes=["cnet-toggles"]):
        c["enabled"] = gr.Checkbox(label="Enable", value=False, elem_id=eid("enabled"),
                                   elem_classes=["cnet-unit-enabled"])
        c["low_vram"] = gr.Checkbox(label="Low VRAM", value=default.low_vram, elem_id=eid("low_vram"))
        c["pixel_perfect"] = gr.Checkbox(label="Pixel Perfect", value=default.pixel_perfect,
                                         elem_id=eid("pixel_perfect"))
        c["independent_image"] = gr.Checkbox(
            label="Use its own control image (not the img2img input)", value=False,
            visible=options.is_img2img, elem_id=eid("independent_image"))
        preview_button = gr.Button("Preview", elem_id=eid("preview_button"), size="sm")
        dims_button = gr.Button(f"{DIMENSIONS_SYMBOL} Send dimensions", elem_id=eid("send_dimensions"),
                                size="sm", visible=options.width is not None)
    c["control_type"] = gr.Radio(types, value=catalog.ALL_TYPES, label="Control Type",
                                 elem_id=eid("control_type"))
    with gr.Row():
        c["module"] = gr.Dropdown(modules, value=catalog.NO_MODULE, label="Preprocessor", elem_id=eid("module"))
        c["model"] = gr.Dropdown(models, value=catalog.NO_MODEL, label="Model", elem_id=eid("model"))
        refresh = gr.Button(REFRESH_SYMBOL, elem_id=eid("refresh_models"), elem_classes=["cnet-tool"])
    with gr.Row():
        c["weight"] = gr.Slider(0.0, 2.0, value=default.weight, step=0.05, label="Control Weight",
                                elem_id=eid("weight"))
        c["guidance_start"] = gr.Slider(0.0, 1.0, value=0.0, step=0.01, label="Starting Control Step",
                                        elem_id=eid("guidance_start"))
        c["guidance_end"] = gr.Slider(0.0, 1.0, value=1.0, step=0.01, label="Ending Control Step",
                                      elem_id=eid("guidance_end"))
    with gr.Row():
        c["processor_res"] = gr.Slider(64, 2048, value=-1, step=8, label="Preprocessor Resolution",
                                       visible=False, elem_id=eid("processor_res"))
        c["threshold_a"] = gr.Slider(-1, 255, value=-1, step=1, label="Threshold A", visible=False,
                                     elem_id=eid("threshold_a"))
        c["threshold_b"] = gr.Slider(-1, 255, value=-1, step=1, label="Threshold B", visible=False,
                                     elem_id=eid("threshold_b"))
    c["control_mode"] = gr.Radio(ControlMode.choices(), value=default.control_mode.value, label="Control Mode",
                                 elem_id=eid("control_mode"))
    c["resize_mode"] = gr.Radio(ResizeMode.choices(), value=default.resize_mode.value, label="Resize Mode",
                                elem_id=eid("resize_mode"))
    c["hr_option"] = gr.Radio(HiResFixOption.choices(), value=default.hr_option.value, label="Hires-Fix Option",
                              visible=not options.is_img2img, elem_id=eid("hr_option"))
    # ControlNet-Union models only: "Unknown" takes the type from the preprocessor's control type
    c["union_control_type"] = gr.Dropdown(UnionControlType.choices(), value=default.union_control_type.value,
                                          label="Union Control Type", elem_id=eid("union_control_type"))

    sliders = [c["processor_res"], c["threshold_a"], c["threshold_b"]]
    c["module"].change(on_module_change, [c["module"], c["pixel_perfect"]], sliders, queue=False)
    c["pixel_perfect"].change(on_module_change, [c["module"], c["pixel_perfect"]], sliders, queue=False)
    c["module"].change(on_module_multi_inputs, [c["module"]], [c["multi_images"], multi_note], queue=False)
    c["control_type"].change(on_control_type_change, [c["control_type"], c["module"], c["model"]],
                             [c["module"], c["model"]], queue=False)
    if options.is_img2img:  # the unit's own image only matters when it does not follow the img2img input
        c["independent_image"].change(lambda own: gr.update(visible=own), [c["independent_image"]], [c["image"]],
                                      queue=False)
    size = [options.width, options.height] if options.width is not None and options.height is not None else []
    preview_inputs = [c["image"], c["module"], c["processor_res"], c["threshold_a"], c["threshold_b"],
                      c["pixel_perfect"], c["resize_mode"]] + size
    preview_button.click(run_preview, preview_inputs, [preview])
    if size:
        dims_button.click(send_dimensions, [c["image"]], size, queue=False)
    return UnitControls(index, c, preview, refresh)


def build_control_panel(options: PanelOptions) -> ControlPanel:
    try:
        type_map = catalog.control_types()
    except Exception:  # a registry that cannot load yet must not take the whole UI down with it
        type_map = {catalog.ALL_TYPES: {"module_list": [catalog.NO_MODULE], "model_list": [catalog.NO_MODEL]}}
    modules = type_map[catalog.ALL_TYPES]["module_list"]
    models = type_map[catalog.ALL_TYPES]["model_list"]
    types = list(type_map)
    units = []
    with gr.Accordion("ControlNet", open=options.open, elem_id=f"{options.elem_prefix}_accordion",
                      elem_classes=["cnet-panel"]):
        with gr.Tabs(elem_id=f"{options.elem_prefix}_units", elem_classes=["cnet-unit-tabs"]):
            for i in range(options.unit_count):
                with gr.Tab(f"ControlNet Unit {i}", elem_id=f"{options.elem_prefix}_unit{i}_tab",
                            elem_classes=["cnet-unit-tab"]):
                    units.append(_build_unit(i, options, modules, models, types))
    pairs = [component for unit in units for component in (unit.components["control_type"], unit.components["model"])]
    for unit in units:  # any unit's refresh button updates all of them
        unit.refresh.click(refresh_models, pairs, [u.components["model"] for u in units], queue=False)
    return ControlPanel(units)
