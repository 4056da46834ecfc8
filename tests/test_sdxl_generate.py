"""SDXL bases end to end: a tiny SDXL base (two text encoders) saved as the single sgm file users have loads
offline; `generate` with an SDXL ControlNet equals diffusers' StableDiffusionXLControlNetPipeline; ControlNets
of the other family are refused with one sentence and nothing stays hooked."""
import numpy as np
import pytest
import torch
from PIL import Image

from control_fixtures import one_thread
from tiny_checkpoint import write_tiny_sdxl_single_file
from lib_controlnet import tiny_models
from lib_controlnet.cli import main

_threads = pytest.fixture(scope="module", autouse=True)(one_thread)
SEED, STEPS, PROMPT, NEGATIVE = 5, 3, "a red house", "blurry"


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    from lib_controlnet.base_model import load_pipeline
    from lib_controlnet.models import save_controlnet_ldm

    root = tmp_path_factory.mktemp("sdxl")
    write_tiny_sdxl_single_file(root / "sdxl.safetensors", config_dir=root / "sdxl-config")
    pipe = load_pipeline(root / "sdxl.safetensors", str(root / "sdxl-config"))
    controlnet = tiny_models.tiny_controlnet(unet=pipe.unet, seed=11)
    controlnet.save_pretrained(root / "cn-folder")
    save_controlnet_ldm(controlnet, root / "cn.safetensors", dtype="fp32")
    image = np.zeros((64, 64, 3), np.uint8)
    image[16:48, 16:48] = 255
    image[24:40, 24:40] = (np.random.RandomState(0).rand(16, 16, 3) * 255).astype(np.uint8)
    Image.fromarray(image).save(root / "control.png")
    return root


def reference(files, **kwargs):
    from diffusers import StableDiffusionXLControlNetPipeline

    from lib_controlnet.base_model import load_pipeline
    from lib_controlnet.models import load_controlnet

    base = load_pipeline(files / "sdxl.safetensors", str(files / "sdxl-config"))
    pipe = StableDiffusionXLControlNetPipeline(**base.components, controlnet=load_controlnet(files / "cn-folder"))
    pipe.set_progress_bar_config(disable=True)
    out = pipe(PROMPT, negative_prompt=NEGATIVE, image=Image.open(files / "control.png"), num_inference_steps=STEPS,
               width=64, height=64, guidance_scale=7.0, generator=torch.Generator().manual_seed(SEED), **kwargs)
    return np.asarray(out.images[0]).astype(int)


def run_cli(files, out, model, *extra):
    return main(["generate", "--base", str(files / "sdxl.safetensors"), "--base-config", str(files / "sdxl-config"),
                 "--prompt", PROMPT, "--negative-prompt", NEGATIVE, "--guidance-scale", "7",
                 "--unit", f"module=none,model={files / model},image={files / 'control.png'}",
                 "--steps", str(STEPS), "--size", "64x64", "--seed", str(SEED), "--out", str(out), *extra])


@pytest.mark.parametrize("model", ["cn.safetensors", "cn-folder"])
def test_sdxl_generate_equals_diffusers_sdxl_controlnet_pipeline(files, tmp_path, model):
    assert run_cli(files, tmp_path, model) == 0
    ours = np.asarray(Image.open(tmp_path / "image-0.png")).astype(int)
    assert np.abs(ours - reference(files)).max() <= 1
    assert "Sampler: Euler" in (tmp_path / "infotext.txt").read_text()


def test_sdxl_micro_conditioning_reaches_unet_and_controlnet(files):
    """original_size / crop / target_size change the image exactly as diffusers' pipeline does with them."""
    from lib_controlnet.base_model import load_pipeline
    from lib_controlnet.generate import GenerateRequest, generate
    from lib_controlnet.unit import ControlUnit

    micro = dict(original_size=(128, 96), crop_top_left=(8, 4), target_size=(64, 64))
    unit = ControlUnit(module="none", model=str(files / "cn-folder"), image=np.asarray(Image.open(files / "control.png")))
    request = GenerateRequest(base="", prompt=PROMPT, negative_prompt=NEGATIVE, units=[unit], steps=STEPS, width=64,
                              height=64, seed=SEED, guidance_scale=7.0, **micro)
    pipe = load_pipeline(files / "sdxl.safetensors", str(files / "sdxl-config"))
    ours = np.asarray(generate(request, pipe=pipe).images[0]).astype(int)
    expected = reference(files, original_size=micro["original_size"], crops_coords_top_left=micro["crop_top_left"],
                         target_size=micro["target_size"])
    assert np.abs(ours - expected).max() <= 1
    assert np.abs(expected - reference(files)).max() > 1  # the numbers matter, so the comparison can fail
    assert not pipe.unet._forward_pre_hooks


def test_other_family_controlnet_is_one_sentence_and_nothing_hooked(files, tmp_path, capsys):
    from lib_controlnet.base_model import load_pipeline
    from lib_controlnet.generate import GenerateRequest, generate
    from lib_controlnet.errors import UserError
    from lib_controlnet.models import save_controlnet_ldm
    from lib_controlnet.unit import ControlUnit

    sd15_cn = tmp_path / "sd15-cn.safetensors"
    save_controlnet_ldm(tiny_models.tiny_controlnet("sd15"), sd15_cn, dtype="fp32")
    pipe = load_pipeline(files / "sdxl.safetensors", str(files / "sdxl-config"))
    hint = np.asarray(Image.open(files / "control.png"))
    request = GenerateRequest(base="", prompt=PROMPT, units=[ControlUnit(module="none", model=str(sd15_cn), image=hint)],
                              steps=1, width=64, height=64)
    with pytest.raises(UserError) as error:
        generate(request, pipe=pipe)
    assert "made for another base model" in str(error.value) and "\n" not in str(error.value)
    assert not pipe.unet._forward_pre_hooks

    # the reverse: the SDXL ControlNet on an SD1.5 base, through the CLI
    tiny_models.save_tiny_diffusers_base(tmp_path / "sd15")
    code = main(["generate", "--base", str(tmp_path / "sd15"), "--prompt", "x", "--steps", "1", "--size", "64x64",
                 "--unit", f"module=none,model={files / 'cn.safetensors'},image={files / 'control.png'}",
                 "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "made for another base model" in err and err.count("\n") == 0
    assert not (tmp_path / "out" / "image-0.png").exists()
