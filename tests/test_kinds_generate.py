"""Control-LoRA and ControlNet-LLLite as a user runs them: files in the models folder are listed by the model list,
and `python -m lib_controlnet generate` on a tiny SDXL single-file base gives what diffusers' SDXL pipelines give
with each kind's published definition (the merged full ControlNet; the LLLite modules wrapped around the UNet's
q/k/v layers), with the unit in the infotext."""
import numpy as np
import pytest
import torch
from PIL import Image

from kind_files import DIFFUSERS_NAMES, published, reference_state, write_control_lora, write_lllite
from tiny_checkpoint import write_tiny_sdxl_single_file
from lib_controlnet import tiny_models
from lib_controlnet.cli import main

pytestmark = pytest.mark.usefixtures("one_torch_thread")
SEED, STEPS, PROMPT = 5, 3, "a red house"


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    from lib_controlnet.base_model import load_pipeline
    from lib_controlnet.models import diffusers_to_ldm, unet_diffusers_to_ldm

    root = tmp_path_factory.mktemp("kinds-generate")
    write_tiny_sdxl_single_file(root / "sdxl.safetensors", config_dir=root / "sdxl-config")
    unet = load_pipeline(root / "sdxl.safetensors", str(root / "sdxl-config")).unet
    models = root / "models"
    models.mkdir()
    controlnet = tiny_models.tiny_controlnet(unet=unet, seed=11)
    own = {k: v for k, v in diffusers_to_ldm(controlnet.state_dict()).items()
           if k.startswith(("input_hint_block.", "zero_convs.", "middle_block_out."))}
    base = unet_diffusers_to_ldm(unet.state_dict())
    lora = write_control_lora(models / "control-lora-canny-rank4.safetensors", base, own)
    lllite = write_lllite(models / "kohya_controllllite_xl_canny.safetensors", unet, names=DIFFUSERS_NAMES)
    image = np.zeros((64, 64, 3), np.uint8)
    image[16:48, 16:48] = 255
    image[24:40, 24:40] = (np.random.RandomState(0).rand(16, 16, 3) * 255).astype(np.uint8)
    Image.fromarray(image).save(root / "control.png")
    from lib_controlnet.models import ldm_to_diffusers

    controlnet.load_state_dict(ldm_to_diffusers(reference_state(base, lora)), strict=True)
    return dict(root=root, models=models, merged=controlnet, lllite=lllite,
                hint=torch.from_numpy(image).float().div(255).permute(2, 0, 1)[None])


def run_cli(files, out, model, weight):
    root = files["root"]
    return main(["generate", "--base", str(root / "sdxl.safetensors"), "--base-config", str(root / "sdxl-config"),
                 "--prompt", PROMPT, "--guidance-scale", "7",
                 "--unit", f"module=none,model={model},weight={weight},image={root / 'control.png'}",
                 "--steps", str(STEPS), "--size", "64x64", "--seed", str(SEED), "--prediction-type", "epsilon",
                 "--out", str(out)])


def run_reference(files, pipeline_class, **extra):
    from lib_controlnet.base_model import load_pipeline

    base = load_pipeline(files["root"] / "sdxl.safetensors", str(files["root"] / "sdxl-config"))
    components = dict(base.components)
    if "unet" in extra:
        components["unet"] = extra.pop("unet")(components["unet"])
    pipe = pipeline_class(**components, **extra.pop("init", {}))
    pipe.set_progress_bar_config(disable=True)
    out = pipe(PROMPT, num_inference_steps=STEPS, width=64, height=64, guidance_scale=7.0,
               generator=torch.Generator().manual_seed(SEED), **extra)
    return np.asarray(out.images[0]).astype(int)


def test_model_list_shows_both_kinds(files):
    from lib_controlnet.models import ModelRegistry

    names = ModelRegistry([files["models"]]).refresh()
    assert [n.split(" [")[0] for n in names] == ["control-lora-canny-rank4", "kohya_controllllite_xl_canny"]


def test_generate_with_control_lora_equals_the_merged_controlnet_pipeline(files, tmp_path):
    from diffusers import StableDiffusionXLControlNetPipeline

    model = files["models"] / "control-lora-canny-rank4.safetensors"
    assert run_cli(files, tmp_path, model, 0.9) == 0
    ours = np.asarray(Image.open(tmp_path / "image-0.png")).astype(int)
    expected = run_reference(files, StableDiffusionXLControlNetPipeline, init=dict(controlnet=files["merged"]),
                             image=Image.open(files["root"] / "control.png"), controlnet_conditioning_scale=0.9)
    assert np.abs(ours - expected).max() <= 1
    assert "control-lora-canny-rank4" in (tmp_path / "infotext.txt").read_text()


def test_generate_with_lllite_equals_the_published_definition(files, tmp_path):
    from diffusers import StableDiffusionXLPipeline

    model = files["models"] / "kohya_controllllite_xl_canny.safetensors"
    assert run_cli(files, tmp_path, model, 0.8) == 0
    ours = np.asarray(Image.open(tmp_path / "image-0.png")).astype(int)
    expected = run_reference(files, StableDiffusionXLPipeline, unet=lambda unet: published(
        unet, files["lllite"], files["hint"], 0.8, names=DIFFUSERS_NAMES))
    plain = run_reference(files, StableDiffusionXLPipeline)
    assert np.abs(ours - expected).max() <= 1
    assert np.abs(ours - plain).max() > 8  # and the modules did change the image
    assert "kohya_controllllite_xl_canny" in (tmp_path / "infotext.txt").read_text()
