"""Multi-Inputs in the panel: the unit's upload of several images (a gradio File, file_count="multiple") shown
for image-prompt preprocessors, its value as gradio's own File.preprocess makes it from what the browser sends,
through the panel's flat values to a unit whose image is the list, and that unit's image prompt equals the one
an API client gets by sending the same images as a list (each encoded, their features averaged)."""
import numpy as np
import pytest
import torch
from PIL import Image

from annotator_settings import annotator_folder
from control_fixtures import diffusers_pair, unit
from annotators import clip_vision
from lib_controlnet import tiny_models
from lib_controlnet.control import ControlJob, PreparedUnit
from lib_controlnet.control_units import prepare_units
from lib_controlnet.ip_attention import image_tokens
from lib_controlnet.models import load_control_model
from lib_controlnet.unit import ControlUnit

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture()
def annotator_dir(tmp_path):
    clip_vision.random_encoder_file(tmp_path / "annotators", "clip_h", hidden_size=32, projection_dim=24)
    with annotator_folder(str(tmp_path / "annotators")):
        yield


def test_multi_inputs_upload_is_the_units_image_list(annotator_dir, tmp_path):
    import gradio as gr

    from lib_controlnet.ui.control_panel import PanelOptions, build_control_panel, on_module_multi_inputs
    from lib_controlnet.ui.unit_args import UNIT_FIELDS, units_from_args, values_of

    with gr.Blocks():
        panel = build_control_panel(PanelOptions(unit_count=1))
    upload = panel.units[0].components["multi_images"]
    assert upload.file_count == "multiple" and upload.visible is False
    assert len(panel.inputs()) == len(UNIT_FIELDS)
    # the module's change event: shown for an image-prompt preprocessor, hidden and emptied for a map one
    shown, note = on_module_multi_inputs("ip-adapter_clip_h")
    assert shown["visible"] is True and "value" not in shown and note["visible"] is False
    hidden, note = on_module_multi_inputs("canny")
    assert hidden["visible"] is False and hidden["value"] is None and note["visible"] is True

    arrays = [(np.random.RandomState(seed).rand(30 + 10 * seed, 40, 3) * 255).astype(np.uint8) for seed in (1, 2)]
    paths = []
    for index, array in enumerate(arrays):
        paths.append(tmp_path / f"face{index}.png")
        Image.fromarray(array).save(paths[-1])
    files = upload.preprocess([{"name": str(p), "data": None, "is_file": True, "orig_name": p.name} for p in paths])
    values = values_of(ControlUnit(enabled=True, module="ip-adapter_clip_h", model="ipa"), control_type="IP-Adapter")
    values[UNIT_FIELDS.index("multi_images")] = files
    values[UNIT_FIELDS.index("image")] = {"image": np.zeros((8, 8, 3), np.uint8), "mask": None}  # the files win
    values[UNIT_FIELDS.index("independent_image")] = False
    [panel_unit] = units_from_args(values)
    assert isinstance(panel_unit.unit.image, list) and len(panel_unit.unit.image) == 2
    assert panel_unit.independent_image  # img2img keeps uploaded images rather than its input

    unet, _ = diffusers_pair("sd15")
    torch.save(tiny_models.random_ip_adapter_state(unet, "plus", embed_dim=32), tmp_path / "ipa.bin")
    adapter = load_control_model(tmp_path / "ipa.bin")
    [prepared] = prepare_units(ControlJob(units=[panel_unit.unit], width=64, height=64, steps=4,
                                          load_model=lambda name: adapter))
    assert all(np.array_equal(a, b) for a, b in zip(prepared.source, arrays))
    api = PreparedUnit(unit(module="ip-adapter_clip_h", model="ipa"), adapter, arrays)
    single = PreparedUnit(unit(module="ip-adapter_clip_h", model="ipa"), adapter, arrays[:1])
    with torch.no_grad():
        got, expected, one = image_tokens(prepared), image_tokens(api), image_tokens(single)
    assert torch.equal(got, expected) and (got - one).abs().max() > 1e-4  # both images count
    # without files the sketch is the unit's single image, as before
    values[UNIT_FIELDS.index("multi_images")] = None
    [panel_unit] = units_from_args(values)
    assert panel_unit.unit.image.shape == (8, 8, 3) and not panel_unit.independent_image
