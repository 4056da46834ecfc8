"""The WebUI's real ldm UNetModel, hooked by us, against diffusers' UNet + ControlNet on the same weights."""
import pytest
import torch

from control_fixtures import diffusers_pair, inputs, ldm_unet_like, unit
from lib_controlnet.control import ControlJob, Controller, PreparedUnit, RowLayout
from lib_controlnet.control_forward import added_embedding_input
from lib_controlnet.hosts import ldm as host
from lib_controlnet.unit import ControlMode

pytestmark = pytest.mark.usefixtures("one_torch_thread", "no_grad")


class InterruptedException(BaseException):
    """What the WebUI's sampler raises on Interrupt (modules.sd_samplers_common) is not an Exception subclass
    in every version; a BaseException checks the harder case."""


@pytest.fixture(scope="module", params=["sd15", "sd2", "sdxl"])
def pair(request):
    family = request.param
    unet, controlnet = diffusers_pair(family)
    return family, unet, controlnet, ldm_unet_like(unet, family), inputs(family)


def ldm_call(ldm_unet, family, data, unet=None):
    y = None
    if family == "sdxl":
        y = added_embedding_input(unet, **data["added"])
    timesteps = data["timestep"].expand(data["sample"].shape[0])
    return ldm_unet(data["sample"], timesteps, context=data["context"], y=y)


def make_controller(controlnet, data, **fields):
    return Controller(ControlJob(units=[PreparedUnit(unit(**fields), controlnet, data["hint"])], width=64, height=64,
                                 steps=10))


def test_hooked_ldm_unet_equals_diffusers_unet_plus_controlnet(pair):
    family, unet, controlnet, ldm_unet, data = pair
    added = dict(added_cond_kwargs=data["added"]) if family == "sdxl" else {}
    down, mid = controlnet(data["sample"], data["timestep"], data["context"], controlnet_cond=data["hint"],
                           return_dict=False, **added)
    expected = unet(data["sample"], data["timestep"], data["context"], down_block_additional_residuals=down,
                    mid_block_additional_residual=mid, **added).sample
    with host.hooked(ldm_unet, make_controller(controlnet, data)):
        got = ldm_call(ldm_unet, family, data, unet)
    assert (got - expected).abs().max() <= 1e-4
    assert (got - ldm_call(ldm_unet, family, data, unet)).abs().max() > 1e-2


def test_controlnet_more_important_in_webui_row_order(pair):
    """WebUI batches cond rows first: the unconditional row must come out as if uncontrolled."""
    family, unet, controlnet, ldm_unet, data = pair
    plain = ldm_call(ldm_unet, family, data, unet)
    ctrl = make_controller(controlnet, data, control_mode=ControlMode.CONTROL)
    with host.hooked(ldm_unet, ctrl):
        ctrl.begin_step(0, 10, RowLayout.webui_cfg([1]))
        got = ldm_call(ldm_unet, family, data, unet)
    assert torch.equal(got[1], plain[1])
    assert (got[0] - plain[0]).abs().max() > 1e-3


@pytest.mark.parametrize("failure", [RuntimeError("boom"), KeyboardInterrupt(), InterruptedException()])
def test_hooks_gone_after_failure_and_output_bit_identical(pair, failure):
    family, unet, controlnet, ldm_unet, data = pair
    before = ldm_call(ldm_unet, family, data, unet)
    ctrl = make_controller(controlnet, data)
    with pytest.raises(type(failure)):
        with host.hooked(ldm_unet, ctrl):
            ldm_call(ldm_unet, family, data, unet)
            raise failure
    assert _hook_count(ldm_unet) == 0
    assert torch.equal(ldm_call(ldm_unet, family, data, unet), before)


def test_failure_inside_the_unet_call_leaves_nothing(pair):
    """An error raised by a block mid-forward (residuals already computed) must not leak into later calls."""
    family, unet, controlnet, ldm_unet, data = pair
    before = ldm_call(ldm_unet, family, data, unet)

    def explode(module, args):
        raise KeyboardInterrupt

    ctrl = make_controller(controlnet, data)
    with pytest.raises(KeyboardInterrupt):
        with host.hooked(ldm_unet, ctrl):
            handle = ldm_unet.output_blocks[3].register_forward_pre_hook(explode)
            try:
                ldm_call(ldm_unet, family, data, unet)
            finally:
                handle.remove()
    assert _hook_count(ldm_unet) == 0
    assert torch.equal(ldm_call(ldm_unet, family, data, unet), before)


def test_other_extensions_wrappers_still_run(pair):
    family, unet, controlnet, ldm_unet, data = pair
    ran = []
    original_forward = ldm_unet.forward

    def wrapped_forward(*args, **kwargs):  # "another extension" replacing forward on the instance
        ran.append("wrapper")
        return original_forward(*args, **kwargs)

    ldm_unet.forward = wrapped_forward
    handle = ldm_unet.middle_block.register_forward_hook(lambda m, a, o: ran.append("their hook"))
    try:
        expected_ctrl = make_controller(controlnet, data)
        with host.hooked(ldm_unet, expected_ctrl):
            got = ldm_call(ldm_unet, family, data, unet)
    finally:
        handle.remove()
        del ldm_unet.forward
    assert ran == ["wrapper", "their hook"]
    with host.hooked(ldm_unet, make_controller(controlnet, data)):
        assert torch.equal(ldm_call(ldm_unet, family, data, unet), got)
    assert _hook_count(ldm_unet) == 0


def _hook_count(module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in module.modules())


def test_install_clears_hooks_a_dead_job_left_behind(pair):
    family, unet, controlnet, ldm_unet, data = pair
    first = host.install(ldm_unet, make_controller(controlnet, data))  # never removed: the job "died"
    one_set = _hook_count(ldm_unet)
    second = host.install(ldm_unet, make_controller(controlnet, data))
    assert _hook_count(ldm_unet) == one_set
    second.remove()
    first.remove()  # idempotent, harmless
    assert _hook_count(ldm_unet) == 0


@pytest.mark.parametrize("unet_family, controlnet_family", [("sd15", "sdxl"), ("sdxl", "sd15")])
def test_controlnet_of_the_other_family_is_one_sentence_and_nothing_hooked(unet_family, controlnet_family):
    """In the WebUI: an SDXL ControlNet on the SD1.5 ldm UNet, and an SD1.5 one on the sgm-shaped SDXL UNet."""
    from lib_controlnet.control import ControlError

    unet, _ = diffusers_pair(unet_family)
    ldm_unet = ldm_unet_like(unet, unet_family)
    _, controlnet = diffusers_pair(controlnet_family)
    data = inputs(unet_family)
    before = ldm_call(ldm_unet, unet_family, data, unet)
    with pytest.raises(ControlError) as error:
        with host.hooked(ldm_unet, make_controller(controlnet, inputs(controlnet_family))):
            pass
    assert "made for another base model" in str(error.value) and "\n" not in str(error.value)
    assert _hook_count(ldm_unet) == 0 and torch.equal(ldm_call(ldm_unet, unet_family, data, unet), before)
