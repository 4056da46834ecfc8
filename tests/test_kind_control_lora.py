"""Control-LoRA: a file in Stability AI's layout (`lora_controlnet` marker, `<layer>.up` / `<layer>.down` factors for
the encoder layers the ControlNet copies, full tensors for its own layers and for what was trained in full) is
recognised and loads; on both hosts its ControlNet is the base UNet's encoder + up @ down + the file's tensors,
giving exactly the residuals of a full diffusers ControlNet holding those merged weights; it is built in memory,
cached by base and file, and the base UNet stays bit-identical."""
import pytest
import torch
from safetensors.torch import save_file

from control_fixtures import diffusers_pair, inputs, ldm_unet_like, unit
from kind_files import RANK, reference_state, write_control_lora
from lib_controlnet.control import ControlJob, Controller, PreparedUnit
from lib_controlnet.control_forward import added_embedding_input
from lib_controlnet.hosts import diffusers as diffusers_host
from lib_controlnet.hosts import ldm as ldm_host
from lib_controlnet.models import ModelFileError, diffusers_to_ldm, kind_of_file, ldm_to_diffusers, load_control_model
from lib_controlnet.models import unet_diffusers_to_ldm
from lib_controlnet.models.kinds import CONTROLNET
from lib_controlnet.models.kinds.control_lora import CONTROL_LORA, MERGED

pytestmark = pytest.mark.usefixtures("one_torch_thread", "no_grad")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("control_lora")
    unet, controlnet = diffusers_pair("sdxl")
    ldm_unet = ldm_unet_like(unet, "sdxl")
    own = {k: v for k, v in diffusers_to_ldm(controlnet.state_dict()).items()
           if k.startswith(("input_hint_block.", "zero_convs.", "middle_block_out."))}
    base_ldm = unet_diffusers_to_ldm(unet.state_dict())
    path = root / "control-lora-canny-rank4.safetensors"
    file = write_control_lora(path, base_ldm, own)
    # the full ControlNet holding the merged weights: diffusers' own class, loaded from the reference state
    full = controlnet
    full.load_state_dict(ldm_to_diffusers(reference_state(base_ldm, file)), strict=True)
    return dict(path=path, unet=unet, ldm_unet=ldm_unet, full=full, data=inputs("sdxl"), file=file, root=root)


def controller(model, data, **fields):
    return Controller(ControlJob(units=[PreparedUnit(unit(**fields), model, data["hint"])], width=64, height=64,
                                 steps=10))


def ldm_call(setup):
    data = setup["data"]
    y = added_embedding_input(setup["unet"], **data["added"])
    return setup["ldm_unet"](data["sample"], data["timestep"].expand(2), context=data["context"], y=y)


def reference(setup, weight=0.8):
    data = setup["data"]
    down, mid = setup["full"](data["sample"], data["timestep"], data["context"], controlnet_cond=data["hint"],
                              added_cond_kwargs=data["added"], return_dict=False)
    return setup["unet"](data["sample"], data["timestep"], data["context"], added_cond_kwargs=data["added"],
                         down_block_additional_residuals=[d * weight for d in down],
                         mid_block_additional_residual=mid * weight).sample


def snapshot(module):
    return {k: v.clone() for k, v in module.state_dict().items()}


def test_recognised_merged_equals_full_controlnet_on_both_hosts_base_unchanged(setup):
    assert kind_of_file(setup["path"]) is CONTROL_LORA
    weights = load_control_model(setup["path"])
    assert CONTROL_LORA.n_outputs(weights) == 10  # SDXL: 9 skips + the middle block
    expected = reference(setup)
    ldm_before, unet_before = snapshot(setup["ldm_unet"]), snapshot(setup["unet"])
    plain = ldm_call(setup)
    MERGED.clear()
    ctrl = controller(weights, setup["data"], weight=0.8)
    with ldm_host.hooked(setup["ldm_unet"], ctrl):
        got = ldm_call(setup)
    assert (got - expected).abs().max() <= 1e-4
    assert (got - plain).abs().max() > 1e-2
    merged = ctrl.units[0].model
    assert ctrl.units[0].kind is CONTROLNET and type(merged).__name__ == "ControlNetModel"
    # its merged weights are the reference's, tensor for tensor, and share no memory with the base
    full = setup["full"].state_dict()
    assert all(torch.allclose(v, full[k], atol=1e-6) for k, v in merged.state_dict().items())
    base_pointers = {p.data_ptr() for p in setup["ldm_unet"].parameters()}
    assert not base_pointers & {p.data_ptr() for p in merged.parameters()}
    with diffusers_host.hooked(setup["unet"], controller(load_control_model(setup["path"]), setup["data"],
                                                         weight=0.8)):
        got = setup["unet"](setup["data"]["sample"], setup["data"]["timestep"], setup["data"]["context"],
                            added_cond_kwargs=setup["data"]["added"]).sample
    assert (got - expected).abs().max() <= 1e-4
    for before, module in ((ldm_before, setup["ldm_unet"]), (unet_before, setup["unet"])):
        assert all(torch.equal(v, before[k]) for k, v in module.state_dict().items())
    assert sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in setup["ldm_unet"].modules()) == 0
    assert torch.equal(ldm_call(setup), plain)


def test_merged_model_cached_by_base_weights_and_file(setup):
    weights = load_control_model(setup["path"])
    MERGED.clear()
    first = CONTROL_LORA.for_base(weights, setup["ldm_unet"])
    assert CONTROL_LORA.for_base(load_control_model(setup["path"]), setup["ldm_unet"]) is first
    ldm_unet = setup["ldm_unet"]
    saved = ldm_unet.input_blocks[1][0].in_layers[2].weight.clone()
    try:  # another checkpoint loaded into the same module objects, as the WebUI does
        ldm_unet.input_blocks[1][0].in_layers[2].weight.add_(1.0)
        second = CONTROL_LORA.for_base(weights, ldm_unet)
        assert second is not first
        conv1 = [model.down_blocks[0].resnets[0].conv1.weight for model in (first, second)]
        assert not torch.equal(*conv1)
    finally:
        ldm_unet.input_blocks[1][0].in_layers[2].weight.copy_(saved)
    MERGED.clear()


def test_control_lora_for_another_base_is_one_sentence_and_nothing_hooked(setup):
    unet, _ = diffusers_pair("sd15")
    ldm_unet = ldm_unet_like(unet, "sd15")
    data = inputs("sd15")
    plain = ldm_unet(data["sample"], data["timestep"].expand(2), context=data["context"])
    with pytest.raises(ModelFileError) as error:
        with ldm_host.hooked(ldm_unet, controller(load_control_model(setup["path"]), data)):
            pass
    message = str(error.value)
    assert "is a Control-LoRA for SDXL and does not fit the loaded SD1.5 model" in message, message
    assert "\n" not in message and message.endswith(".")
    assert sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in ldm_unet.modules()) == 0
    assert torch.equal(ldm_unet(data["sample"], data["timestep"].expand(2), context=data["context"]), plain)


@pytest.mark.parametrize("damage, fragment", [
    ("drop_down", "has its 'up' factor but not its 'down' factor"),
    ("drop_hint", "without the ControlNet's own layers (no input_hint_block.0.weight)"),
    ("bad_rank", "do not fit together"),
    ("stranger", "holds weights a Control-LoRA does not have"),
])
def test_damaged_files_get_one_sentence(setup, tmp_path, damage, fragment):
    tensors = dict(setup["file"])
    if damage == "drop_down":
        tensors.pop("input_blocks.4.1.proj_in.down")
    elif damage == "drop_hint":
        tensors.pop("input_hint_block.0.weight")
    elif damage == "bad_rank":
        tensors["input_blocks.4.1.proj_in.down"] = torch.zeros(RANK + 1, 64)
    else:
        tensors["output_blocks.0.0.in_layers.2.weight"] = torch.zeros(4, 4)
    path = tmp_path / "control-lora-damaged.safetensors"
    save_file(tensors, str(path))
    message = str(pytest.raises(ModelFileError, load_control_model, path).value)
    assert fragment in message and "\n" not in message and message.endswith("."), message


def test_one_channel_hint_gets_the_luma_of_the_control_map():
    """A ControlNet whose hint block takes one channel (conditioning_channels=1, as a gray-input Control-LoRA's
    input_hint_block.0 can be) embeds the control map's luma, as one-channel T2I-Adapters do."""
    from diffusers import ControlNetModel

    from lib_controlnet.control_forward import hint_embedding

    torch.manual_seed(0)
    model = ControlNetModel(block_out_channels=(32, 64), down_block_types=("DownBlock2D", "DownBlock2D"),
                            conditioning_channels=1, conditioning_embedding_out_channels=(16, 32),
                            cross_attention_dim=32, norm_num_groups=32).eval()
    rgb = torch.rand(1, 3, 64, 64)
    luma = (rgb * torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(1, keepdim=True)
    assert torch.allclose(hint_embedding(model, rgb), model.controlnet_cond_embedding(luma), atol=1e-6)
