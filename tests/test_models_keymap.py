"""ldm <-> diffusers key mapping: exact round trips, and agreement with independent implementations
(diffusers' own single-file converter for ControlNets, the WebUI's ldm UNetModel for whole UNets)."""
import pytest
import torch

from lib_controlnet.models import (
    ModelFileError, diffusers_to_ldm, ldm_to_diffusers, unet_diffusers_to_ldm, unet_ldm_to_diffusers,
)
from lib_controlnet.tiny_models import FAMILIES, tiny_controlnet, tiny_unet


@pytest.fixture(scope="module")
def controlnets():
    return {family: tiny_controlnet(family) for family in FAMILIES}


@pytest.fixture(scope="module")
def unets():
    return {family: tiny_unet(family) for family in FAMILIES}


@pytest.mark.parametrize("family", FAMILIES)
def test_controlnet_round_trip_is_exact(controlnets, family):
    state = controlnets[family].state_dict()
    ldm = diffusers_to_ldm(state, prefix="control_model.")
    assert all(k.startswith("control_model.") for k in ldm)
    back = ldm_to_diffusers(ldm)
    assert list(back) == list(state)
    assert all(back[k] is state[k] for k in state)  # same tensors: nothing copied or cast
    # and the other way round, starting from ldm names without prefix
    stripped = diffusers_to_ldm(state)
    assert diffusers_to_ldm(ldm_to_diffusers(stripped)) == stripped


@pytest.mark.parametrize("family", FAMILIES)
def test_unet_round_trip_is_exact(unets, family):
    state = unets[family].state_dict()
    ldm = unet_diffusers_to_ldm(state, prefix="model.diffusion_model.")
    back = unet_ldm_to_diffusers(ldm)
    assert list(back) == list(state)
    assert all(back[k] is state[k] for k in state)


def test_known_ldm_names(controlnets, unets):
    sd15 = diffusers_to_ldm(controlnets["sd15"].state_dict())
    for key in ("time_embed.0.weight", "input_blocks.0.0.weight", "input_blocks.1.0.in_layers.0.weight",
                "input_blocks.1.1.proj_in.weight", "input_blocks.3.0.op.weight", "middle_block.1.norm.weight",
                "middle_block.2.out_layers.3.weight", "input_hint_block.0.weight", "input_hint_block.14.weight",
                "zero_convs.11.0.weight", "middle_block_out.0.bias", "input_blocks.7.0.skip_connection.weight"):
        assert key in sd15, key
    assert len([k for k in sd15 if k.startswith("zero_convs.") and k.endswith(".weight")]) == 12
    xl = diffusers_to_ldm(controlnets["sdxl"].state_dict())
    assert "label_emb.0.0.weight" in xl and "label_emb.0.2.bias" in xl
    assert len([k for k in xl if k.startswith("zero_convs.") and k.endswith(".weight")]) == 9
    assert "input_blocks.7.1.transformer_blocks.1.attn2.to_k.weight" in xl  # depth 2 at the last level
    assert xl["input_blocks.4.1.proj_in.weight"].ndim == 2  # linear projection kept as is
    assert sd15["input_blocks.1.1.proj_in.weight"].ndim == 4  # SD1: 1x1 conv kept as is
    unet = unet_diffusers_to_ldm(unets["sd15"].state_dict())
    assert {"out.0.weight", "out.2.weight", "output_blocks.2.1.conv.weight", "output_blocks.5.2.conv.weight",
            "output_blocks.11.1.proj_out.weight"} <= set(unet)


def test_unknown_keys_are_reported():
    with pytest.raises(ModelFileError, match="no ldm equivalent"):
        diffusers_to_ldm({"down_blocks.0.resnets.0.conv1.weight": 0, "something.else": 1})
    with pytest.raises(ModelFileError, match="not an ldm"):
        ldm_to_diffusers({"foo.weight": 0})


@pytest.mark.parametrize("family", ["sd15", "sd2"])
def test_unet_weights_run_in_the_webui_ldm_unet(unets, family):
    """The WebUI's own UNetModel (stable-diffusion-sdkit's ldm) holding our mapped weights gives the output of
    the diffusers UNet: the mapping is right, not just self-consistent."""
    from ldm.modules.diffusionmodules.openaimodel import UNetModel

    source = unets[family]
    context_dim = source.config.cross_attention_dim
    heads = dict(num_heads=2) if family == "sd15" else dict(num_head_channels=16)
    ldm_unet = UNetModel(
        image_size=16, in_channels=4, model_channels=32, out_channels=4, num_res_blocks=2,
        attention_resolutions=[1, 2, 4], channel_mult=[1, 1, 2, 2], use_spatial_transformer=True, legacy=False,
        context_dim=context_dim, use_linear_in_transformer=(family == "sd2"), **heads,
    ).eval()
    ldm_unet.load_state_dict(unet_diffusers_to_ldm(source.state_dict()), strict=True)
    torch.manual_seed(0)
    x, t, context = torch.randn(2, 4, 16, 16), torch.tensor([10, 700]), torch.randn(2, 5, context_dim)
    with torch.no_grad():
        expected = source(x, t, encoder_hidden_states=context).sample
        got = ldm_unet(x, t, context=context)
    assert (expected - got).abs().max() < 1e-5


@pytest.mark.parametrize("family", FAMILIES)
def test_controlnet_mapping_matches_diffusers_single_file_converter(controlnets, family, tmp_path):
    """diffusers' own ldm -> diffusers converter, fed our ldm file, lands on the original weights."""
    from diffusers import ControlNetModel
    from safetensors.torch import save_file

    source = controlnets[family]
    path = tmp_path / "cn.safetensors"
    save_file(diffusers_to_ldm(source.state_dict(), prefix="control_model."), str(path))
    source.save_config(str(tmp_path / "config"))
    loaded = ControlNetModel.from_single_file(str(path), config=str(tmp_path / "config"))
    expected, got = source.state_dict(), loaded.state_dict()
    assert set(expected) == set(got)
    # diffusers 0.31's converter has no rule for SDXL's label_emb: it leaves add_embedding unfilled (meta).
    unfilled = {k for k, v in got.items() if v.is_meta}
    assert unfilled == ({k for k in got if k.startswith("add_embedding.")} if family == "sdxl" else set())
    assert all(torch.equal(expected[k], got[k]) for k in expected if k not in unfilled)
