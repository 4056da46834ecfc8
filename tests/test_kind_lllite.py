"""ControlNet-LLLite: a random file in kohya-ss's key layout (`lllite_unet_<layer>.conditioning1.* / down.0 / mid.0 /
up.0`, attn1 q/k/v and attn2 q of the encoder's and middle block's transformers) is recognised and loads; our
pre-hooks on the WebUI's ldm UNet and on diffusers' UNet give what the published definition, written out below on
a copy of the UNet, gives; weight, start/end and control mode act; after jobs, errors and interrupts the UNet is
bit-identical and hook-free."""

import pytest
import torch
from safetensors.torch import save_file

from control_fixtures import diffusers_pair, inputs, ldm_unet_like, unit
from kind_files import COND, MLP, PROJECTIONS, TRANSFORMERS, published, write_lllite
from lib_controlnet.control import ControlJob, Controller, PreparedUnit, RowLayout
from lib_controlnet.control_forward import added_embedding_input
from lib_controlnet.hosts import diffusers as diffusers_host
from lib_controlnet.hosts import ldm as ldm_host
from lib_controlnet.models import ModelFileError, kind_of_file, load_control_model
from lib_controlnet.models.kinds import LLLITE

pytestmark = pytest.mark.usefixtures("one_torch_thread", "no_grad")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("lllite")
    unet, _ = diffusers_pair("sdxl")
    ldm_unet = ldm_unet_like(unet, "sdxl")
    path = root / "kohya_controllllite_xl_canny.safetensors"
    weights = write_lllite(path, ldm_unet)
    return dict(path=path, unet=unet, ldm_unet=ldm_unet, weights=weights, data=inputs("sdxl"))


def call(unet, diffusers_unet, data):
    y = added_embedding_input(diffusers_unet, **data["added"])
    return unet(data["sample"], data["timestep"].expand(2), context=data["context"], y=y)


def controller(model, data, steps=10, **fields):
    return Controller(ControlJob(units=[PreparedUnit(unit(**fields), model, data["hint"])], width=64, height=64,
                                 steps=steps))


def hooks(module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in module.modules())


def test_file_recognised_and_both_hosts_equal_the_published_definition(setup):
    unet, ldm_unet, data = setup["unet"], setup["ldm_unet"], setup["data"]
    assert kind_of_file(setup["path"]) is LLLITE
    model = load_control_model(setup["path"])
    assert LLLITE.n_outputs(model) == len(TRANSFORMERS) * len(PROJECTIONS)
    before = {k: v.clone() for k, v in ldm_unet.state_dict().items()}
    plain = call(ldm_unet, unet, data)
    expected = call(published(ldm_unet, setup["weights"], data["hint"], 0.7), unet, data)
    with ldm_host.hooked(ldm_unet, controller(model, data, weight=0.7)):
        got = call(ldm_unet, unet, data)
    assert (got - expected).abs().max() <= 1e-5
    assert (got - plain).abs().max() > 1e-2
    with diffusers_host.hooked(unet, controller(model, data, weight=0.7)):
        got = unet(data["sample"], data["timestep"], data["context"], added_cond_kwargs=data["added"]).sample
    assert (got - expected).abs().max() <= 1e-4
    assert hooks(ldm_unet) == 0 and hooks(unet) == 0
    assert all(torch.equal(v, before[k]) for k, v in ldm_unet.state_dict().items())
    assert torch.equal(call(ldm_unet, unet, data), plain)


def test_embedding_once_per_job_start_end_and_control_mode(setup):
    unet, ldm_unet, data = setup["unet"], setup["ldm_unet"], setup["data"]
    model = load_control_model(setup["path"])
    runs = []
    handle = model.blocks[0].conditioning1.register_forward_hook(lambda *a: runs.append(1))
    plain = call(ldm_unet, unet, data)
    ctrl = controller(model, data, guidance_start=0.3, guidance_end=0.6)
    with ldm_host.hooked(ldm_unet, ctrl):
        outputs = []
        for step in range(10):
            ctrl.begin_step(step, 10, RowLayout.all_cond(2))
            outputs.append(call(ldm_unet, unet, data))
    handle.remove()
    assert runs == [1]  # the hint's embedding does not depend on the timestep
    for step, out in enumerate(outputs):
        assert torch.equal(out, plain) != (0.3 <= step / 10 <= 0.6), step
    ctrl = controller(model, data, control_mode="ControlNet is more important")
    with ldm_host.hooked(ldm_unet, ctrl):
        ctrl.begin_step(0, 10, RowLayout.webui_cfg([1]))
        got = call(ldm_unet, unet, data)
    assert torch.equal(got[1], plain[1]) and not torch.equal(got[0], plain[0])


def test_interrupt_inside_the_call_leaves_the_unet_bit_identical(setup):
    unet, ldm_unet, data = setup["unet"], setup["ldm_unet"], setup["data"]
    plain = call(ldm_unet, unet, data)

    def explode(module, args):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        with ldm_host.hooked(ldm_unet, controller(load_control_model(setup["path"]), data)):
            handle = ldm_unet.middle_block.register_forward_pre_hook(explode)
            try:
                call(ldm_unet, unet, data)
            finally:
                handle.remove()
    assert hooks(ldm_unet) == 0
    assert torch.equal(call(ldm_unet, unet, data), plain)


def test_lllite_for_another_base_is_one_sentence_and_nothing_hooked(setup):
    unet, _ = diffusers_pair("sd15")
    ldm_unet = ldm_unet_like(unet, "sd15")
    data = inputs("sd15")
    with pytest.raises(ModelFileError, match="made for another base model") as error:
        with ldm_host.hooked(ldm_unet, controller(load_control_model(setup["path"]), data)):
            pass
    assert "\n" not in str(error.value)
    assert hooks(ldm_unet) == 0


@pytest.mark.parametrize("damage, fragment", [
    ("drop_bias", "is a damaged ControlNet-LLLite file: module lllite_unet_input_blocks_4_1_transformer_blocks_0_attn1"
                  "_to_q has no mid.0.bias"),
    ("misfit", "do not fit together"),
    ("bad_conditioning", "do not fit together"),
    ("stranger", "holds a weight a ControlNet-LLLite file does not have"),
])
def test_damaged_files_get_one_sentence(setup, tmp_path, damage, fragment):
    tensors = dict(setup["weights"])
    name = "lllite_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q"
    if damage == "drop_bias":
        tensors.pop(f"{name}.mid.0.bias")
    elif damage == "misfit":
        tensors[f"{name}.mid.0.weight"] = torch.zeros(MLP, MLP + COND + 1)
    elif damage == "bad_conditioning":
        tensors[f"{name}.conditioning1.0.weight"] = torch.zeros(COND // 2, 4, 4, 4)  # a 4-channel hint
    else:
        tensors["lllite_unet_extra.weight"] = torch.zeros(2)
    path = tmp_path / "lllite-damaged.safetensors"
    save_file(tensors, str(path))
    message = str(pytest.raises(ModelFileError, load_control_model, path).value)
    assert fragment in message and "\n" not in message and message.endswith("."), message


def test_two_units_sharing_one_loaded_model_act_as_their_own_units(setup):
    """The model cache hands two units of the same file one model object: each unit's hooks read its own call
    (an inactive second unit changes nothing)."""
    unet, ldm_unet, data = setup["unet"], setup["ldm_unet"], setup["data"]
    model = load_control_model(setup["path"])
    with ldm_host.hooked(ldm_unet, controller(model, data, weight=0.7)):
        one = call(ldm_unet, unet, data)
    units = [PreparedUnit(unit(weight=0.7), model, data["hint"]), PreparedUnit(unit(weight=0.0), model, data["hint"])]
    with ldm_host.hooked(ldm_unet, Controller(ControlJob(units=units, width=64, height=64, steps=10))):
        two = call(ldm_unet, unet, data)
    assert torch.equal(one, two)


def test_mask_limits_where_the_modules_act(setup):
    unet, ldm_unet, data = setup["unet"], setup["ldm_unet"], setup["data"]
    model = load_control_model(setup["path"])
    plain = call(ldm_unet, unet, data)
    outputs = {}
    for value in (0.0, 1.0, None):
        mask = None if value is None else torch.full((1, 1, 64, 64), value)
        units = [PreparedUnit(unit(weight=0.7), model, data["hint"], mask=mask)]
        with ldm_host.hooked(ldm_unet, Controller(ControlJob(units=units, width=64, height=64, steps=10))):
            outputs[value] = call(ldm_unet, unet, data)
    assert torch.equal(outputs[0.0], plain)  # masked out everywhere: the modules add nothing
    assert torch.allclose(outputs[1.0], outputs[None], atol=1e-6) and not torch.equal(outputs[1.0], plain)

