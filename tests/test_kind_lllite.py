"""ControlNet-LLLite: a random file in kohya-ss's key layout (`lllite_unet_<layer>.conditioning1.* / down.0 / mid.0 /
up.0`, attn1 q/k/v and attn2 q of the encoder's and middle block's transformers) is recognised and loads; our
pre-hooks on the WebUI's ldm UNet and on diffusers' UNet give what the published definition, written out below on
a copy of the UNet, gives; weight, start/end and control mode act; after jobs, errors and interrupts the UNet is
bit-identical and hook-free."""
import copy

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from control_fixtures import diffusers_pair, inputs, ldm_unet_like, one_thread, unit
from lib_controlnet.control import ControlJob, Controller, PreparedUnit, RowLayout
from lib_controlnet.control_forward import added_embedding_input
from lib_controlnet.hosts import diffusers as diffusers_host
from lib_controlnet.hosts import ldm as ldm_host
from lib_controlnet.models import ModelFileError, kind_of_file, load_control_model
from lib_controlnet.models.kinds import LLLITE

_threads = pytest.fixture(scope="module", autouse=True)(one_thread)
COND, MLP = 8, 8
# (ldm transformer, depth): kohya's depth is 1 / 2 / 3 for input blocks 1-2 / 4-5 / 7-8 and 3 for the middle block
TRANSFORMERS = [("input_blocks.4.1", 2), ("input_blocks.5.1", 2), ("input_blocks.7.1", 3), ("input_blocks.8.1", 3),
                ("middle_block.1", 3)]
PROJECTIONS = ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn2.to_q")


@pytest.fixture(autouse=True)
def _no_grad():
    with torch.no_grad():
        yield


def conditioning_shapes(depth: int) -> list:
    """kohya's conditioning1 per depth: 3 -> COND/2 at 1/4, then to COND at 1/8 (1), 1/16 (2), 1/32 (3)."""
    half = COND // 2
    first = (half, 3, 4, 4)
    return {1: [first, (COND, half, 2, 2)], 2: [first, (COND, half, 4, 4)],
            3: [first, (half, half, 4, 4), (COND, half, 2, 2)]}[depth]


def write_lllite(path, ldm_unet, seed=3) -> dict:
    generator = torch.Generator().manual_seed(seed)
    modules = dict(ldm_unet.named_modules())
    tensors = {}
    for transformer, depth in TRANSFORMERS:
        for projection in PROJECTIONS:
            layer = f"{transformer}.transformer_blocks.0.{projection}"
            width = modules[layer].in_features
            name = "lllite_unet_" + layer.replace(".", "_")
            for i, shape in enumerate(conditioning_shapes(depth)):
                tensors[f"{name}.conditioning1.{2 * i}.weight"] = torch.randn(shape, generator=generator) * 0.2
                tensors[f"{name}.conditioning1.{2 * i}.bias"] = torch.randn(shape[0], generator=generator) * 0.1
            for part, (out_f, in_f) in (("down", (MLP, width)), ("mid", (MLP, MLP + COND)), ("up", (width, MLP))):
                tensors[f"{name}.{part}.0.weight"] = torch.randn(out_f, in_f, generator=generator) * 0.3
                tensors[f"{name}.{part}.0.bias"] = torch.randn(out_f, generator=generator) * 0.1
    save_file(tensors, str(path))
    return tensors


class PublishedLLLite(torch.nn.Module):
    """The definition (kohya's description): x -> org(x + multiplier * up(relu(mid(cat([e, relu(down(x))]))))),
    e = conditioning1(2 * hint - 1) as (N, h*w, C) tokens, repeated to the batch."""

    def __init__(self, org, weights: dict, name: str, hint, multiplier: float):
        super().__init__()
        self.org, self.w, self.name, self.multiplier = org, weights, name, multiplier
        e = hint * 2 - 1
        convs = sorted({int(k.split(".")[-2]) for k in weights if k.startswith(f"{name}.conditioning1.")})
        for n, index in enumerate(convs):
            weight = weights[f"{name}.conditioning1.{index}.weight"]
            e = F.conv2d(e, weight, weights[f"{name}.conditioning1.{index}.bias"], stride=weight.shape[-1])
            if n < len(convs) - 1:
                e = F.relu(e)
        self.e = e.flatten(2).permute(0, 2, 1)

    def forward(self, x):
        w, n = self.w, self.name
        e = self.e.repeat(x.shape[0] // self.e.shape[0], 1, 1)
        h = torch.cat([e, F.relu(F.linear(x, w[f"{n}.down.0.weight"], w[f"{n}.down.0.bias"]))], dim=2)
        h = F.relu(F.linear(h, w[f"{n}.mid.0.weight"], w[f"{n}.mid.0.bias"]))
        h = F.linear(h, w[f"{n}.up.0.weight"], w[f"{n}.up.0.bias"])
        return self.org(x + h * self.multiplier)


def published(ldm_unet, weights, hint, multiplier):
    reference = copy.deepcopy(ldm_unet)
    modules = dict(reference.named_modules())
    for transformer, _ in TRANSFORMERS:
        for projection in PROJECTIONS:
            layer = f"{transformer}.transformer_blocks.0.{projection}"
            parent, child = layer.rsplit(".", 1)
            name = "lllite_unet_" + layer.replace(".", "_")
            setattr(modules[parent], child, PublishedLLLite(modules[layer], weights, name, hint, multiplier))
    return reference


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
    ("stranger", "holds a weight a ControlNet-LLLite file does not have"),
])
def test_damaged_files_get_one_sentence(setup, tmp_path, damage, fragment):
    tensors = dict(setup["weights"])
    name = "lllite_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q"
    if damage == "drop_bias":
        tensors.pop(f"{name}.mid.0.bias")
    elif damage == "misfit":
        tensors[f"{name}.mid.0.weight"] = torch.zeros(MLP, MLP + COND + 1)
    else:
        tensors["lllite_unet_extra.weight"] = torch.zeros(2)
    path = tmp_path / "lllite-damaged.safetensors"
    save_file(tensors, str(path))
    message = str(pytest.raises(ModelFileError, load_control_model, path).value)
    assert fragment in message and "\n" not in message and message.endswith("."), message
