"""ControlNet-Union / ProMax: xinsir's layouts (one diffusers-named file, a diffusers folder) are recognised and load;
residuals through the unit, controller and diffusers host equal diffusers 0.32.2's ControlNetUnionModel (reference
outputs in tests/data, made by tests/data/make_union_reference.py); units on one union model combine in one forward;
control types come from the preprocessor or `union_control_type` (API, infotext, CLI); the control-type filter lists
a union model under every type it has; `generate` with a union model equals diffusers' SDXL ControlNet pipeline
when its union parts add nothing."""
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from lib_controlnet.control import ControlError, ControlJob, Controller, PreparedUnit, RowLayout
from lib_controlnet.hosts import diffusers as diffusers_host
from lib_controlnet.models import ModelFileError, kind_of_file, load_control_model
from lib_controlnet.models.kinds import UNION, panel_types_of
from lib_controlnet.unit import ControlUnit, ControlUnitError, UnionControlType

DATA = Path(__file__).parent / "data"
FOLDER = DATA / "union_promax_tiny"
CASES = {"hard_edge": ([3], [0]), "depth_and_tile": ([1, 6], [1, 2]), "inpaint": ([7], [3])}
pytestmark = pytest.mark.usefixtures("one_torch_thread", "no_grad")


@pytest.fixture(scope="module")
def ref():
    return load_file(str(DATA / "union_reference.safetensors"))


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """The layouts users download: the folder as published, the single file as its ProMax weights are renamed
    and dropped among ControlNet models, and a 6-type union (not ProMax) single file."""
    root = tmp_path_factory.mktemp("union")
    shutil.copytree(FOLDER, root / "controlnet-union-sdxl-1.0")
    single = root / "controlnet-union-promax-sdxl.safetensors"
    shutil.copy(FOLDER / "diffusion_pytorch_model.safetensors", single)
    state = load_file(str(single))
    state["task_embedding"] = state["task_embedding"][:6].clone()
    state["control_add_embedding.linear_1.weight"] = state["control_add_embedding.linear_1.weight"][:, :6 * 8].clone()
    save_file(state, str(root / "controlnet-union-sdxl.safetensors"))
    return root


def tiny_unet():
    """A UNet whose skips take the tiny union model's residuals (same levels, channels, added embedding)."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=4, block_out_channels=(32, 32), layers_per_block=1, down_block_types=("DownBlock2D",
        "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32,
        attention_head_dim=2, use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=64).eval()


def call_unet(unet, ref, residuals=None, weight=1.0):
    extra = {}
    if residuals is not None:
        down, mid = residuals
        extra = dict(down_block_additional_residuals=[d * weight for d in down], mid_block_additional_residual=mid * weight)
    return unet(ref["sample"], ref["timestep"], ref["context"], added_cond_kwargs={
        "text_embeds": ref["text_embeds"], "time_ids": ref["time_ids"]}, **extra).sample


def reference_residuals(ref, case):
    return [ref[f"{case}.down.{i}"] for i in range(4)], ref[f"{case}.mid"]


def prepared(model, ref, hint, **fields):
    unit = ControlUnit(**dict(dict(module="none", model="union-promax"), **fields))
    return PreparedUnit(unit, model, ref["hints"][hint:hint + 1])


def job(units, steps=10):
    return ControlJob(units=units, width=32, height=32, steps=steps)


@pytest.mark.parametrize("layout", ["controlnet-union-sdxl-1.0", "controlnet-union-promax-sdxl.safetensors"])
def test_layouts_are_recognised_and_equal_diffusers_union_model(files, ref, layout):
    from lib_controlnet.control_forward import added_embedding_input, hint_embedding
    from lib_controlnet.models.kinds.union import union_residuals

    assert kind_of_file(files / layout) is UNION
    model = load_control_model(files / layout, dtype="fp32")
    assert model.n_control_types == 8 and UNION.owns(model)
    y = added_embedding_input(model, ref["text_embeds"], ref["time_ids"])
    for case, (types, hints) in CASES.items():
        conditions = [hint_embedding(model, ref["hints"][i:i + 1]).expand(2, -1, -1, -1) for i in hints]
        down, mid = union_residuals(model, ref["sample"], ref["timestep"], ref["context"], conditions, types, y)
        expected_down, expected_mid = reference_residuals(ref, case)
        for got, expected in zip(down + [mid], expected_down + [expected_mid]):
            assert (got - expected).abs().max() <= 1e-4, case


def test_unit_through_controller_and_host_equals_reference_and_leaves_unet_unchanged(files, ref):
    unet = tiny_unet()
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    plain = call_unet(unet, ref)
    model = load_control_model(files / "controlnet-union-sdxl-1.0", dtype="fp32")
    # canny is a hard-edge preprocessor: the type comes from it
    controller = Controller(job([prepared(model, ref, 0, module="canny", weight=0.7)]))
    with diffusers_host.hooked(unet, controller):
        got = call_unet(unet, ref)
    expected = call_unet(unet, ref, reference_residuals(ref, "hard_edge"), weight=0.7)
    assert (got - expected).abs().max() <= 1e-4 and (got - plain).abs().max() > 1e-2
    assert torch.equal(call_unet(unet, ref), plain)
    assert all(torch.equal(v, before[k]) for k, v in unet.state_dict().items())


def test_two_units_on_one_union_model_run_in_one_forward(files, ref):
    """Depth (from its preprocessor) and ProMax's Tile (named in union_control_type) in one forward, as diffusers'
    union pipeline takes a list of conditions."""
    unet = tiny_unet()
    model = load_control_model(files / "controlnet-union-promax-sdxl.safetensors", dtype="fp32")
    forwards = []
    handle = model.conv_in.register_forward_hook(lambda *a: forwards.append(1))
    units = [prepared(model, ref, 1, module="depth_midas", weight=0.5),
             prepared(model, ref, 2, union_control_type="Tile", weight=0.5)]
    with diffusers_host.hooked(unet, Controller(job(units))):
        got = call_unet(unet, ref)
    handle.remove()
    assert forwards == [1]
    expected = call_unet(unet, ref, reference_residuals(ref, "depth_and_tile"), weight=0.5)
    assert (got - expected).abs().max() <= 1e-4

    # other weights: two forwards, whose residuals add up
    units = [prepared(model, ref, 0, module="canny", weight=0.5), prepared(model, ref, 3, module="inpaint_only")]
    with diffusers_host.hooked(unet, Controller(job(units))):
        got = call_unet(unet, ref)
    edge, inpaint = reference_residuals(ref, "hard_edge"), reference_residuals(ref, "inpaint")
    summed = ([a * 0.5 + b for a, b in zip(edge[0], inpaint[0])], edge[1] * 0.5 + inpaint[1])
    assert (got - call_unet(unet, ref, summed)).abs().max() <= 1e-4


def test_start_end_and_control_mode_apply_to_union_units(files, ref):
    unet = tiny_unet()
    model = load_control_model(files / "controlnet-union-sdxl-1.0", dtype="fp32")
    plain = call_unet(unet, ref)
    controller = Controller(job([prepared(model, ref, 0, module="canny", guidance_start=0.5)]))
    with diffusers_host.hooked(unet, controller):
        controller.begin_step(2, 10)
        assert torch.equal(call_unet(unet, ref), plain)
        controller.begin_step(6, 10)
        assert not torch.equal(call_unet(unet, ref), plain)
    controller = Controller(job([prepared(model, ref, 0, module="canny", control_mode="ControlNet is more important")]))
    with diffusers_host.hooked(unet, controller):
        controller.begin_step(0, 10, RowLayout.diffusers_cfg(1))  # row 0 unconditional, row 1 conditional
        got = call_unet(unet, ref)
    assert torch.equal(got[0], plain[0]) and not torch.equal(got[1], plain[1])


def test_types_a_model_lacks_or_cannot_tell_get_one_sentence(files, ref):
    six = load_control_model(files / "controlnet-union-sdxl.safetensors", dtype="fp32")
    assert kind_of_file(files / "controlnet-union-sdxl.safetensors") is UNION and six.n_control_types == 6
    with pytest.raises(ControlError, match="6 control types, which has no Tile type; use the ProMax"):
        Controller(job([prepared(six, ref, 0, module="tile_resample")]))
    with pytest.raises(ControlError, match="needs a union control type.*set union_control_type to one of OpenPose"):
        Controller(job([prepared(six, ref, 0)]))
    with pytest.raises(ControlError, match="'shuffle' has no union control type"):
        Controller(job([prepared(six, ref, 0, module="shuffle")]))


def test_damaged_union_file_is_one_sentence(files, tmp_path):
    state = load_file(str(files / "controlnet-union-promax-sdxl.safetensors"))
    del state["spatial_ch_projs.weight"]
    save_file(state, str(tmp_path / "broken-union.safetensors"))
    with pytest.raises(ModelFileError, match="broken-union.safetensors looks like a ControlNet-Union model but its "
                                             "union parts .* are incomplete") as error:
        load_control_model(tmp_path / "broken-union.safetensors")
    assert "\n" not in str(error.value)
    state = load_file(str(files / "controlnet-union-promax-sdxl.safetensors"))
    state["controlnet_down_blocks.1.weight"] = state["controlnet_down_blocks.1.weight"][:16].clone()
    save_file(state, str(tmp_path / "wrong-union.safetensors"))
    with pytest.raises(ModelFileError, match="does not fit the ControlNet-Union architecture"):
        load_control_model(tmp_path / "wrong-union.safetensors")


def test_union_control_type_in_payload_infotext_and_cli():
    from lib_controlnet.cli.generate import parse_unit
    from lib_controlnet.infotext import unit_from_infotext, unit_to_infotext

    unit = ControlUnit.from_dict({"module": "none", "model": "union", "union_control_type": "Hard Edge"})
    assert unit.union_control_type is UnionControlType.HARD_EDGE
    assert ControlUnit.from_dict({"union_control_type": 6}).union_control_type is UnionControlType.TILE
    assert unit.to_dict()["union_control_type"] == "Hard Edge"
    text = unit_to_infotext(unit)
    assert "Union Control Type: Hard Edge" in text
    assert unit_from_infotext(text).union_control_type is UnionControlType.HARD_EDGE
    assert "Union" not in unit_to_infotext(ControlUnit(module="canny", model="x"))  # other units' text unchanged
    with pytest.raises(ControlUnitError, match="union_control_type: expected one of"):
        ControlUnit.from_dict({"union_control_type": "Sketchy"})
    assert parse_unit(f"model=u,image={__file__},union=Soft Edge").union_control_type is UnionControlType.SOFT_EDGE


def test_control_type_filter_lists_union_models_under_every_type_they_have(files, tmp_path):
    from lib_controlnet.models import get_registry
    from lib_controlnet.settings import get_settings, update_settings
    from lib_controlnet.ui import catalog

    models = tmp_path / "models"
    models.mkdir()
    for name in ("controlnet-union-sdxl-1.0", "controlnet-union-sdxl.safetensors"):
        (shutil.copytree if (files / name).is_dir() else shutil.copy)(files / name, models / name)
    shutil.copy(files / "controlnet-union-sdxl.safetensors", models / "control_v11p_sd15_canny.safetensors")
    (models / "control_v11f1e_sd15_tile.safetensors").write_bytes(b"not read: a plain name decides")
    save_file({"style_embedding": torch.zeros(1, 8, 32), "ln_post.weight": torch.zeros(32)},
              str(models / "coadapter-style-sd15v1.safetensors"))  # its name tells no type; its keys do
    assert panel_types_of(models / "controlnet-union-sdxl-1.0")[-1] == "Inpaint"
    saved = get_settings().model_dirs
    update_settings(model_dirs=[models])
    try:
        get_registry().refresh()
        types = catalog.control_types()
    finally:
        update_settings(model_dirs=saved)
        get_registry().refresh()
    listed = {name: [m.rsplit(" [", 1)[0] for m in entry["model_list"]] for name, entry in types.items()}
    for type_name in ("Canny", "Lineart", "MLSD", "Depth", "OpenPose", "SoftEdge", "Scribble", "NormalMap",
                      "Segmentation"):
        assert "controlnet-union-sdxl-1.0" in listed[type_name] and "controlnet-union-sdxl" in listed[type_name]
    # ProMax alone has Tile and Inpaint; a union file named like a canny ControlNet is listed by its keys
    assert "controlnet-union-sdxl-1.0" in listed["Tile"] and "controlnet-union-sdxl" not in listed["Tile"]
    assert "control_v11p_sd15_canny" in listed["Depth"] and "control_v11f1e_sd15_tile" in listed["Tile"]
    assert "controlnet-union-sdxl-1.0" not in listed["Shuffle"] + listed["Recolor"] + listed["InstructP2P"]
    assert [t for t, names in listed.items() if "coadapter-style-sd15v1" in names] == ["All", "T2I-Adapter"]
    # the WebUI's pre-job check: a union model on an SD1.5 checkpoint is one sentence
    from lib_controlnet.webui import base_fit

    update_settings(model_dirs=[models])
    try:
        sentence = base_fit.mismatch("controlnet-union-sdxl-1.0", "sd15")
    finally:
        update_settings(model_dirs=saved)
    assert sentence.startswith("'controlnet-union-sdxl-1.0' is a ControlNet-Union for SDXL and the loaded checkpoint")
    canny_choices = catalog.panel_model_choices(types, "Canny")  # typed by its kind, so not offered as untyped
    assert not any(name.startswith("coadapter-style") for name in canny_choices)


def test_generate_with_union_whose_parts_add_nothing_equals_sdxl_controlnet_pipeline(tmp_path):
    """With spatial_ch_projs and the type embedding's last layer zero, a union model is exactly the ControlNet its
    other weights make: `generate` (CLI) with it must give diffusers' StableDiffusionXLControlNetPipeline's image."""
    from diffusers import StableDiffusionXLControlNetPipeline

    from tiny_checkpoint import write_tiny_sdxl_single_file
    from lib_controlnet import tiny_models
    from lib_controlnet.base_model import load_pipeline
    from lib_controlnet.cli import main

    write_tiny_sdxl_single_file(tmp_path / "sdxl.safetensors", config_dir=tmp_path / "sdxl-config")
    pipe = load_pipeline(tmp_path / "sdxl.safetensors", str(tmp_path / "sdxl-config"))
    controlnet = tiny_models.tiny_controlnet(unet=pipe.unet, seed=11)
    state = tiny_models.union_from_controlnet(controlnet, union_scale=0.0).state_dict()
    width = controlnet.config.block_out_channels[0]
    folder = tmp_path / "controlnet-union-sdxl-1.0"  # the folder layout, whose config.json names the heads
    folder.mkdir()
    save_file({k: v.contiguous() for k, v in state.items()}, str(folder / "diffusion_pytorch_model.safetensors"))
    config = dict(controlnet.config, _class_name="ControlNetUnionModel", num_control_type=8, num_trans_channel=width,
                  num_trans_head=8, num_trans_layer=1, num_proj_channel=width)
    (folder / "config.json").write_text(json.dumps(config))
    image = np.zeros((64, 64, 3), np.uint8)
    image[16:48, 16:48] = 255
    Image.fromarray(image).save(tmp_path / "control.png")

    assert main(["generate", "--base", str(tmp_path / "sdxl.safetensors"), "--base-config",
                 str(tmp_path / "sdxl-config"), "--prompt", "a house", "--guidance-scale", "7", "--unit",
                 f"module=none,model={folder},image={tmp_path / 'control.png'},union=Depth",
                 "--steps", "2", "--size", "64x64", "--seed", "5", "--prediction-type", "epsilon",
                 "--out", str(tmp_path / "out")]) == 0
    ours = np.asarray(Image.open(tmp_path / "out" / "image-0.png")).astype(int)
    assert "Union Control Type: Depth" in (tmp_path / "out" / "infotext.txt").read_text()
    reference = StableDiffusionXLControlNetPipeline(**pipe.components, controlnet=controlnet)
    reference.set_progress_bar_config(disable=True)
    expected = reference("a house", image=Image.open(tmp_path / "control.png"), num_inference_steps=2, width=64,
                         height=64, guidance_scale=7.0, generator=torch.Generator().manual_seed(5)).images[0]
    assert np.abs(ours - np.asarray(expected).astype(int)).max() <= 1
