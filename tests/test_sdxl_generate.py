"""SDXL bases end to end: a tiny SDXL base (two text encoders) saved as the single sgm file users have loads
offline; `generate` with an SDXL ControlNet equals diffusers' StableDiffusionXLControlNetPipeline; ControlNets
of the other family are refused with one sentence and nothing stays hooked."""
import numpy as np
import pytest
import torch
from PIL import Image

from tiny_checkpoint import write_tiny_sdxl_single_file
from lib_controlnet import tiny_models
from lib_controlnet.cli import main

pytestmark = pytest.mark.usefixtures("one_torch_thread")
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
                 "--steps", str(STEPS), "--size", "64x64", "--seed", str(SEED), "--prediction-type", "epsilon",
                 "--out", str(out), *extra])


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


# ---------------------------------------------------------------------------------------------- loading
def _variant(files, name, dtype=None, extra=None, drop=()):
    from safetensors.torch import load_file, save_file

    state = load_file(str(files / "sdxl.safetensors"))
    state = {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v) for k, v in state.items()
             if not k.startswith(drop or "\0")}
    state.update(extra or {})
    save_file(state, str(files / name))
    return files / name


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_sdxl_file_in_half_precision_loads_both_text_encoders(files, dtype):
    from diffusers import StableDiffusionXLPipeline

    from lib_controlnet.base_model import load_pipeline

    path = _variant(files, f"sdxl-{dtype}.safetensors", dtype)
    pipe = load_pipeline(path, str(files / "sdxl-config"))
    folder = StableDiffusionXLPipeline.from_pretrained(str(files / "sdxl-config"), local_files_only=True)
    assert isinstance(pipe, StableDiffusionXLPipeline)
    for part in ("unet", "text_encoder", "text_encoder_2"):
        ours, theirs = getattr(pipe, part).state_dict(), getattr(folder, part).state_dict()
        assert ours.keys() == theirs.keys()
        assert all(torch.equal(ours[k].float(), theirs[k].to(dtype).float()) for k in ours if ours[k].is_floating_point())
    assert pipe.tokenizer_2.pad_token == "!" and pipe.scheduler.config.prediction_type == "epsilon"


def test_v_pred_marker_and_setting(files):
    from lib_controlnet.base_model import load_pipeline

    path = _variant(files, "sdxl-vpred.safetensors", extra={"v_pred": torch.tensor([]), "ztsnr": torch.tensor([])})
    pipe = load_pipeline(path, str(files / "sdxl-config"))
    assert pipe.scheduler.config.prediction_type == "v_prediction" and pipe.scheduler.config.rescale_betas_zero_snr
    assert load_pipeline(path, str(files / "sdxl-config"), prediction_type="epsilon").scheduler.config.prediction_type \
        == "epsilon"
    plain = load_pipeline(files / "sdxl-config", prediction_type="v_prediction")  # a diffusers folder, by setting
    assert plain.scheduler.config.prediction_type == "v_prediction" and plain.text_encoder_2 is not None


def test_shipped_sdxl_config_is_the_default_and_names_the_mismatch(files):
    """Without --base-config the shipped full-size SDXL configs are used: a tiny file does not fit them, and the
    sentence says which architecture and config were tried and what to pass."""
    from lib_controlnet.base_model import BASE_CONFIGS_DIR, BaseModelError, load_pipeline

    with pytest.raises(BaseModelError) as error:
        load_pipeline(files / "sdxl.safetensors")
    message = str(error.value)
    assert "as SDXL" in message and str(BASE_CONFIGS_DIR / "sdxl") in message and "--base-config" in message
    assert "\n" not in message


def _fake(path, keys):
    from safetensors.torch import save_file

    save_file({k: torch.zeros(shape) for k, shape in keys.items()}, str(path))
    return path


NOT_BASES = {
    "refiner": ({"model.diffusion_model.label_emb.0.0.weight": (8, 2560),
                 "model.diffusion_model.input_blocks.4.1.proj_in.weight": (8, 8),
                 "conditioner.embedders.0.model.positional_embedding": (77, 8),
                 "conditioner.embedders.0.model.text_projection": (8, 8)}, "SDXL refiner"),
    "sd3": ({"model.diffusion_model.joint_blocks.0.context_block.adaLN_modulation.1.bias": (8,),
             "text_encoders.clip_l.transformer.text_model.embeddings.position_embedding.weight": (77, 8)},
            "Stable Diffusion 3"),
    "flux": ({"double_blocks.0.img_attn.norm.key_norm.scale": (8,), "img_in.weight": (8, 8)}, "Flux"),
}


@pytest.mark.parametrize("kind", sorted(NOT_BASES))
def test_refiner_sd3_flux_files_are_named_in_one_sentence(tmp_path, capsys, kind):
    keys, name = NOT_BASES[kind]
    path = _fake(tmp_path / f"{kind}.safetensors", keys)
    code = main(["generate", "--base", str(path), "--prompt", "x", "--steps", "1", "--size", "64x64",
                 "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and name in err and err.count("\n") == 0, err
    assert not (tmp_path / "out").exists()


def test_truncated_sdxl_file_is_one_sentence(files, tmp_path):
    from lib_controlnet.base_model import BaseModelError, load_pipeline

    data = (files / "sdxl.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[:len(data) // 2])
    with pytest.raises(BaseModelError) as error:
        load_pipeline(tmp_path / "cut.safetensors", str(files / "sdxl-config"))
    assert "cut.safetensors" in str(error.value) and "\n" not in str(error.value)
