"""Every ControlNet layout loads (with the right weights and the same residuals as diffusers' own model), and
every kind of bad file gets one clear sentence."""

import pytest
import torch
from safetensors.torch import save_file

from lib_controlnet.models import (
    ModelFileError, diffusers_to_ldm, inspect_model, load_controlnet, save_controlnet_ldm, unet_diffusers_to_ldm,
)
from lib_controlnet.tiny_models import FAMILIES, tiny_controlnet, tiny_unet

EXPECTED_BASE = {"sd15": "sd15", "sd2": "sd2", "sdxl": "sdxl"}


@pytest.fixture(scope="module")
def controlnets():
    return {family: tiny_controlnet(family) for family in FAMILIES}


def residuals(model, family, dtype=torch.float32):
    generator = torch.Generator().manual_seed(0)
    kwargs = {}
    if family == "sdxl":
        kwargs["added_cond_kwargs"] = {"text_embeds": torch.randn(2, 32, generator=generator, dtype=dtype),
                                       "time_ids": torch.randn(2, 6, generator=generator, dtype=dtype)}
    with torch.no_grad():
        down, mid = model(
            torch.randn(2, 4, 8, 8, generator=generator, dtype=dtype), torch.tensor([5, 800]),
            encoder_hidden_states=torch.randn(2, 6, model.config.cross_attention_dim, generator=generator, dtype=dtype),
            controlnet_cond=torch.rand(2, 3, 64, 64, generator=generator, dtype=dtype), return_dict=False, **kwargs)
    return list(down) + [mid]


def assert_same_weights(model, source, dtype=None):
    expected, got = source.state_dict(), model.state_dict()
    assert set(expected) == set(got)
    for key, value in expected.items():
        assert torch.equal(got[key], value if dtype is None else value.to(dtype)), key


@pytest.mark.parametrize("family", FAMILIES)
def test_ldm_file_gives_diffusers_residuals(controlnets, family, tmp_path):
    source = controlnets[family]
    path = save_controlnet_ldm(source, tmp_path / f"control_{family}.safetensors", dtype="fp32")
    info = inspect_model(path)
    assert (info.format, info.base, info.dtype) == ("ldm (control_model.*)", EXPECTED_BASE[family], "fp32")
    assert info.n_params == sum(p.numel() for p in source.parameters())
    model = load_controlnet(path)
    assert_same_weights(model, source)
    expected, got = residuals(source, family), residuals(model, family)
    assert len(got) == (10 if family == "sdxl" else 13)
    assert max(float((a - b).abs().max()) for a, b in zip(expected, got)) <= 1e-5
    assert all(float(a.abs().max()) > 0 for a in got)  # the comparison is not between zeros


@pytest.mark.parametrize("family", FAMILIES)
def test_diffusers_folder_and_single_file(controlnets, family, tmp_path):
    source = controlnets[family]
    source.save_pretrained(str(tmp_path / "folder"), safe_serialization=True)
    info = inspect_model(tmp_path / "folder")
    assert (info.format, info.base) == ("diffusers (folder)", EXPECTED_BASE[family])
    model = load_controlnet(tmp_path / "folder")
    assert_same_weights(model, source)
    assert max(float((a - b).abs().max()) for a, b in zip(residuals(source, family), residuals(model, family))) <= 1e-5

    save_file(source.state_dict(), str(tmp_path / "single.safetensors"))
    assert inspect_model(tmp_path / "single.safetensors").format == "diffusers (single file)"
    assert_same_weights(load_controlnet(tmp_path / "single.safetensors"), source)


def test_stripped_ldm_pth_and_nested_ckpt(controlnets, tmp_path):
    source = controlnets["sd2"]
    ldm = diffusers_to_ldm(source.state_dict())
    torch.save(ldm, tmp_path / "stripped.pth")
    info = inspect_model(tmp_path / "stripped.pth")
    assert (info.format, info.base, info.dtype) == ("ldm (stripped)", "sd2", "fp32")
    assert_same_weights(load_controlnet(tmp_path / "stripped.pth"), source)
    torch.save({"state_dict": {"control_model." + k: v for k, v in ldm.items()}, "epoch": 3}, tmp_path / "t.ckpt")
    assert inspect_model(tmp_path / "t.ckpt").format == "ldm (control_model.*)"
    assert_same_weights(load_controlnet(tmp_path / "t.ckpt"), source)


def test_full_checkpoint_with_control_weights(controlnets, tmp_path):
    source = controlnets["sd15"]
    full = unet_diffusers_to_ldm(tiny_unet("sd15").state_dict(), prefix="model.diffusion_model.")
    full.update(diffusers_to_ldm(source.state_dict(), prefix="control_model."))
    full["first_stage_model.decoder.conv_in.weight"] = torch.zeros(4, 4, 3, 3)
    save_file(full, str(tmp_path / "full.safetensors"))
    info = inspect_model(tmp_path / "full.safetensors")
    assert info.format.startswith("full checkpoint") and info.base == "sd15"
    assert info.n_params == sum(p.numel() for p in source.parameters())  # the ControlNet part only
    assert_same_weights(load_controlnet(tmp_path / "full.safetensors"), source)


@pytest.mark.parametrize("dtype,torch_dtype", [("fp16", torch.float16), ("bf16", torch.bfloat16)])
def test_half_precision_files(controlnets, tmp_path, dtype, torch_dtype):
    source = controlnets["sdxl"]
    path = save_controlnet_ldm(source, tmp_path / "half.safetensors", dtype=dtype)
    assert inspect_model(path).dtype == dtype
    model = load_controlnet(path)
    assert next(model.parameters()).dtype == torch_dtype
    assert_same_weights(model, source, torch_dtype)
    assert next(load_controlnet(path, dtype="fp32").parameters()).dtype == torch.float32


def test_conv_projection_stored_for_a_linear_model(controlnets, tmp_path):
    """Some converted SD2 files keep proj_in/out as 1x1 convs: the same numbers, reshaped to the config's linear."""
    source = controlnets["sd2"]
    source.save_pretrained(str(tmp_path / "folder"), safe_serialization=True)
    state = {k: (v[..., None, None] if ".proj_" in k and v.ndim == 2 else v) for k, v in source.state_dict().items()}
    save_file(state, str(tmp_path / "folder" / "diffusion_pytorch_model.safetensors"))
    model = load_controlnet(tmp_path / "folder")
    assert_same_weights(model, source)


CLDM_YAML = """model:
  target: cldm.cldm.ControlLDM
  params:
    control_stage_config:
      target: cldm.cldm.ControlNet
      params:
        num_head_channels: 16
        use_linear_in_transformer: True
        global_average_pooling: {pooling}
"""


def test_sidecar_configs_for_files_without_metadata(controlnets, tmp_path):
    """Heads cannot be read from weights: the cldm .yaml (or a diffusers .json) next to a file supplies them."""
    source = controlnets["sd2"]
    ldm = diffusers_to_ldm(source.state_dict(), prefix="control_model.")
    save_file(ldm, str(tmp_path / "control_sd21_tiny.safetensors"))
    (tmp_path / "control_sd21_tiny.yaml").write_text(CLDM_YAML.format(pooling="False"))
    model = load_controlnet(tmp_path / "control_sd21_tiny.safetensors")
    assert list(model.config.attention_head_dim) == [2, 2, 4, 4]
    assert max(float((a - b).abs().max()) for a, b in zip(residuals(source, "sd2"), residuals(model, "sd2"))) <= 1e-5

    sd15 = controlnets["sd15"]
    save_file(diffusers_to_ldm(sd15.state_dict()), str(tmp_path / "plain.safetensors"))
    assert load_controlnet(tmp_path / "plain.safetensors").config.attention_head_dim == 8  # SD1 convention
    sd15.save_config(str(tmp_path / "cfg"))
    (tmp_path / "cfg" / "config.json").rename(tmp_path / "plain.json")
    model = load_controlnet(tmp_path / "plain.safetensors")
    assert max(float((a - b).abs().max()) for a, b in zip(residuals(sd15, "sd15"), residuals(model, "sd15"))) <= 1e-5

    save_file(ldm, str(tmp_path / "control_v11e_sd15_shuffle_tiny.safetensors"))
    assert inspect_model(tmp_path / "control_v11e_sd15_shuffle_tiny.safetensors").config["global_pool_conditions"]
    (tmp_path / "control_sd21_tiny.yaml").write_text(CLDM_YAML.format(pooling="True"))
    assert inspect_model(tmp_path / "control_sd21_tiny.safetensors").config["global_pool_conditions"]
