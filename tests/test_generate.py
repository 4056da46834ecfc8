"""Standalone generation: the CLI's images equal diffusers' StableDiffusionControlNetPipeline on the same weights."""
import numpy as np
import pytest
import torch
from PIL import Image

from tiny_checkpoint import write_tiny_single_file
from lib_controlnet import images, tiny_models
from lib_controlnet.cli import main
from lib_controlnet.infotext import parse_infotext, units_from_params
from lib_controlnet.unit import ResizeMode

pytestmark = pytest.mark.usefixtures("one_torch_thread")
SEED, STEPS = 7, 3


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    from diffusers import UNet2DConditionModel

    from lib_controlnet.models import save_controlnet_ldm

    root = tmp_path_factory.mktemp("generate")
    tiny_models.save_tiny_diffusers_base(root / "base")
    unet = UNet2DConditionModel.from_pretrained(root / "base", subfolder="unet")
    controlnet = tiny_models.tiny_controlnet("sd15", unet=unet)
    controlnet.save_pretrained(root / "cn-folder")
    save_controlnet_ldm(controlnet, root / "cn.safetensors", dtype="fp32")
    image = np.zeros((64, 64, 3), np.uint8)
    image[16:48, 16:48] = 255  # a white square: canny finds its outline
    image[24:40, 24:40] = (np.random.RandomState(0).rand(16, 16, 3) * 255).astype(np.uint8)
    Image.fromarray(image).save(root / "control.png")
    return root


def pipeline_reference(files, hint, **kwargs):
    from diffusers import ControlNetModel, StableDiffusionControlNetPipeline

    pipe = StableDiffusionControlNetPipeline.from_pretrained(
        files / "base", controlnet=ControlNetModel.from_pretrained(files / "cn-folder"), safety_checker=None,
        requires_safety_checker=False, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return np.asarray(pipe("a red house", negative_prompt="blurry", image=hint, num_inference_steps=STEPS, width=64,
                           height=64, guidance_scale=7.5, generator=torch.Generator().manual_seed(SEED),
                           **kwargs).images[0]).astype(int)


def run_cli(files, out, unit, *extra):
    return main(["generate", "--base", str(files / "base"), "--prompt", "a red house", "--negative-prompt", "blurry",
                 "--unit", unit, "--steps", str(STEPS), "--size", "64x64", "--seed", str(SEED), "--out", str(out),
                 *extra])


@pytest.mark.parametrize("model", ["cn-folder", "cn.safetensors"])
def test_cli_image_equals_diffusers_controlnet_pipeline(files, tmp_path, model):
    assert run_cli(files, tmp_path, f"module=none,model={files / model},image={files / 'control.png'}") == 0
    ours = np.asarray(Image.open(tmp_path / "image-0.png")).astype(int)
    reference = pipeline_reference(files, Image.open(files / "control.png"))
    assert np.abs(ours - reference).max() <= 1
    assert (tmp_path / "detected-0.png").exists()
    prompt, negative, params = parse_infotext((tmp_path / "infotext.txt").read_text())
    assert (prompt, negative, params["Steps"], params["Seed"], params["CFG scale"]) == (
        "a red house", "blurry", "3", "7", "7.5")
    assert params["Sampler"] == "PLMS" and params["Size"] == "64x64"
    assert units_from_params(params)[0].model == str(files / model)


def test_canny_unit_with_weight_and_window(files, tmp_path):
    unit = f"module=canny,model={files / 'cn-folder'},image={files / 'control.png'},weight=0.6,start=0,end=0.5"
    assert run_cli(files, tmp_path, unit) == 0
    detected = np.asarray(Image.open(tmp_path / "detected-0.png"))
    assert set(np.unique(detected)) == {0, 255}  # an edge map, not the input image
    # diffusers' pipeline given our detected map at the generation size and the weight. PNDM runs 4 steps for 3;
    # end 0.5 (the WebUI's rule: step i is controlled while i/4 <= 0.5, so steps 0-2) is diffusers' end 0.75
    # (it needs (i+1)/4 <= end).
    hint = images.resize_to_target(detected, 64, 64, ResizeMode.INNER_FIT)
    reference = pipeline_reference(files, Image.fromarray(hint), controlnet_conditioning_scale=0.6,
                                   control_guidance_end=0.75)
    ours = np.asarray(Image.open(tmp_path / "image-0.png")).astype(int)
    unit_text = (tmp_path / "infotext.txt").read_text()
    assert "Weight: 0.6" in unit_text and "Guidance End: 0.5" in unit_text
    assert np.abs(ours - reference).max() <= 1


def test_bad_input_is_one_line_and_exit_2(files, tmp_path, capsys):
    assert main(["generate", "--base", str(tmp_path / "missing"), "--prompt", "x", "--out", str(tmp_path)]) == 2
    assert capsys.readouterr().err.strip().count("\n") == 0
    assert run_cli(files, tmp_path, "module=canny,image=x.png") == 2
    assert "needs model" in capsys.readouterr().err
    assert run_cli(files, tmp_path, f"model={files / 'cn-folder'},image={files / 'control.png'},weight=9") == 2
    assert "weight" in capsys.readouterr().err
    assert not (tmp_path / "image-0.png").exists()


def _tiny_single_file(files):
    path = files / "tiny-sd15.safetensors"
    return write_tiny_single_file(files / "base", path), path


def test_single_file_base_loads_offline_with_a_config_folder(files, tmp_path, capsys):
    from lib_controlnet.base_model import BaseModelError, load_pipeline as load_base

    folder, path = _tiny_single_file(files)
    loaded = load_base(path, config=str(files / "base"))
    for part in ("unet", "text_encoder"):
        ours, theirs = getattr(loaded, part).state_dict(), getattr(folder, part).state_dict()
        assert set(ours) == set(theirs) and all(torch.equal(ours[k], theirs[k]) for k in ours)
    unit = f"module=none,model={files / 'cn-folder'},image={files / 'control.png'}"
    assert main(["generate", "--base", str(path), "--base-config", str(files / "base"), "--prompt", "a", "--unit", unit,
                 "--steps", "2", "--size", "64x64", "--out", str(tmp_path)]) == 0
    assert Image.open(tmp_path / "image-0.png").size == (64, 64)
    # Without --base-config the shipped SD1.5 config is used, which this tiny file does not fit: one sentence.
    with pytest.raises(BaseModelError, match="--base-config"):
        load_base(path)


@pytest.mark.parametrize("family, unet_m, text_m", [("sd15", 859.5, 123.1), ("sd2", 865.9, 340.4)])
def test_shipped_base_configs_have_the_real_models_sizes(family, unet_m, text_m):
    """The shipped configs build UNets and text encoders with SD1.5's / SD2.1's parameter counts (on the meta
    device, so nothing is allocated)."""
    import json

    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from lib_controlnet.base_model import BASE_CONFIGS_DIR

    root = BASE_CONFIGS_DIR / family
    with init_empty_weights():
        unet = UNet2DConditionModel.from_config(json.loads((root / "unet" / "config.json").read_text()))
        text = CLIPTextModel(CLIPTextConfig.from_json_file(str(root / "text_encoder" / "config.json")))
    assert round(sum(p.numel() for p in unet.parameters()) / 1e6, 1) == unet_m
    assert round(sum(p.numel() for p in text.parameters()) / 1e6, 1) == text_m
