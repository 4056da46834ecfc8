"""Control through the diffusers host, checked against diffusers' own ControlNet path and the definitions."""
import pytest
import torch

from control_fixtures import diffusers_pair, inputs, unit
from lib_controlnet.control import ControlError, ControlJob, Controller, PreparedUnit, RowLayout
from lib_controlnet.hosts import diffusers as host
from lib_controlnet.unit import ControlMode, HiResFixOption

STEPS = 10

pytestmark = pytest.mark.usefixtures("one_torch_thread", "no_grad")


@pytest.fixture(scope="module")
def sd15():
    unet, controlnet = diffusers_pair("sd15")
    _, second = diffusers_pair("sd15", seed=7)
    return unet, controlnet, second, inputs("sd15")


def controller(units, **job):
    return Controller(ControlJob(units=units, width=64, height=64, steps=job.pop("steps", STEPS), **job))


def reference_residuals(controlnet, data, hint=None, rows=slice(None)):
    """diffusers' own ControlNet forward on the given rows, unscaled."""
    down, mid = controlnet(data["sample"][rows], data["timestep"], data["context"][rows],
                           controlnet_cond=(data["hint"] if hint is None else hint).expand(
                               data["sample"][rows].shape[0], -1, -1, -1), return_dict=False)
    return list(down), mid


def unet_with(unet, data, down=None, mid=None):
    kwargs = {}
    if down is not None:
        kwargs = dict(down_block_additional_residuals=tuple(down), mid_block_additional_residual=mid)
    return unet(data["sample"], data["timestep"], data["context"], **kwargs).sample


def hooked_output(unet, ctrl, data, step=0, rows=None):
    with host.hooked(unet, ctrl):
        ctrl.begin_step(step, STEPS, rows)
        return unet(data["sample"], data["timestep"], data["context"]).sample


def test_one_unit_equals_diffusers_controlnet_path(sd15):
    unet, controlnet, _, data = sd15
    down, mid = reference_residuals(controlnet, data)
    expected = unet_with(unet, data, down, mid)
    ctrl = controller([PreparedUnit(unit(), controlnet, data["hint"])])
    got = hooked_output(unet, ctrl, data, rows=RowLayout.diffusers_cfg(1))
    assert (got - expected).abs().max() <= 1e-5
    assert (got - unet_with(unet, data)).abs().max() > 1e-2  # the control did something


def test_several_units_with_weights_sum(sd15):
    unet, first, second, data = sd15
    hint2 = torch.rand_like(data["hint"])
    d1, m1 = reference_residuals(first, data)
    d2, m2 = reference_residuals(second, data, hint2)
    down = [0.7 * a + 1.3 * b for a, b in zip(d1, d2)]
    expected = unet_with(unet, data, down, 0.7 * m1 + 1.3 * m2)
    ctrl = controller([PreparedUnit(unit(weight=0.7), first, data["hint"]),
                       PreparedUnit(unit(weight=1.3), second, hint2),
                       PreparedUnit(unit(weight=0.0), second, hint2)])
    assert (hooked_output(unet, ctrl, data) - expected).abs().max() <= 1e-5


def test_guidance_start_end_are_fractions_of_steps(sd15):
    unet, controlnet, _, data = sd15
    plain = unet_with(unet, data)
    controlled = unet_with(unet, data, *reference_residuals(controlnet, data))
    ctrl = controller([PreparedUnit(unit(guidance_start=0.3, guidance_end=0.6), controlnet, data["hint"])])
    for step, active in [(0, False), (2, False), (3, True), (6, True), (7, False), (9, False)]:
        got = hooked_output(unet, ctrl, data, step=step)
        assert torch.allclose(got, controlled if active else plain, atol=1e-5), step


def test_prompt_more_important_soft_weights_on_every_row(sd15):
    unet, controlnet, _, data = sd15
    down, mid = reference_residuals(controlnet, data)
    weight = 0.9
    down = [d * weight * 0.825 ** (12 - i) for i, d in enumerate(down)]
    expected = unet_with(unet, data, down, mid * weight)
    ctrl = controller([PreparedUnit(unit(weight=weight, control_mode=ControlMode.PROMPT), controlnet, data["hint"])])
    assert (hooked_output(unet, ctrl, data, rows=RowLayout.diffusers_cfg(1)) - expected).abs().max() <= 1e-5


def test_controlnet_more_important_runs_on_conditional_rows_only(sd15):
    unet, controlnet, _, data = sd15
    rows = RowLayout.diffusers_cfg(1)  # row 0 unconditional, row 1 conditional
    down, mid = reference_residuals(controlnet, data, rows=slice(1, 2))
    full_down = [torch.cat([torch.zeros_like(d), d * 0.825 ** (12 - i)]) for i, d in enumerate(down)]
    expected = unet_with(unet, data, full_down, torch.cat([torch.zeros_like(mid), mid]))
    seen = []
    handle = controlnet.conv_in.register_forward_hook(lambda m, a, o: seen.append(a[0].shape[0]))
    try:
        ctrl = controller([PreparedUnit(unit(control_mode=ControlMode.CONTROL), controlnet, data["hint"])])
        got = hooked_output(unet, ctrl, data, rows=rows)
    finally:
        handle.remove()
    assert (got - expected).abs().max() <= 1e-5
    assert seen == [1]  # one row went through the ControlNet, not two


def test_mask_limits_where_the_unit_acts(sd15):
    unet, controlnet, _, data = sd15
    mask = torch.zeros(1, 1, 64, 64)
    mask[..., :, :32] = 1.0  # left half
    down, mid = reference_residuals(controlnet, data)
    masked = [r * torch.nn.functional.interpolate(mask, size=r.shape[-2:], mode="area") for r in down + [mid]]
    expected = unet_with(unet, data, masked[:-1], masked[-1])
    ctrl = controller([PreparedUnit(unit(), controlnet, data["hint"], mask=mask)])
    assert (hooked_output(unet, ctrl, data) - expected).abs().max() <= 1e-5


def test_batch_images_and_webui_split_calls(sd15):
    """Two images, the WebUI layout (cond rows first), unconditional rows in a separate UNet call."""
    unet, controlnet, _, data = sd15
    hints = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    x = torch.cat([data["sample"], data["sample"].flip(0)])
    ctx = torch.cat([data["context"], data["context"].flip(0)])
    rows = RowLayout.webui_cfg([1, 1])  # rows: cond img0, cond img1, uncond img0, uncond img1
    per_row_hint = hints[[0, 1, 0, 1]]
    down, mid = controlnet(x, data["timestep"], ctx, controlnet_cond=per_row_hint, return_dict=False)
    expected = unet(x, data["timestep"], ctx, down_block_additional_residuals=down,
                    mid_block_additional_residual=mid).sample
    ctrl = controller([PreparedUnit(unit(), controlnet, hints)])
    with host.hooked(unet, ctrl):
        ctrl.begin_step(0, STEPS, rows)
        first = unet(x[:2], data["timestep"], ctx[:2]).sample
        second = unet(x[2:], data["timestep"], ctx[2:]).sample
    assert (torch.cat([first, second]) - expected).abs().max() <= 1e-5


def test_hint_embedding_computed_once_per_job_and_per_hires_size(sd15):
    unet, controlnet, _, data = sd15
    calls = []
    handle = controlnet.controlnet_cond_embedding.register_forward_hook(lambda m, a, o: calls.append(a[0].shape))
    try:
        ctrl = controller([PreparedUnit(unit(), controlnet, data["hint"])], hires_fix=True)
        with host.hooked(unet, ctrl):
            for step in range(3):
                ctrl.begin_step(step, STEPS)
                unet(data["sample"], data["timestep"], data["context"])
            ctrl.set_pass(True, 96, 96)
            big = torch.randn(2, 4, 12, 12)
            for step in range(2):
                ctrl.begin_step(step, STEPS)
                unet(big, data["timestep"], data["context"])
    finally:
        handle.remove()
    assert [tuple(s[-2:]) for s in calls] == [(64, 64), (96, 96)]


def test_hr_option_selects_the_pass(sd15):
    unet, controlnet, _, data = sd15
    plain = unet_with(unet, data)
    for option, low_active, high_active in [(HiResFixOption.LOW_RES_ONLY, True, False),
                                            (HiResFixOption.HIGH_RES_ONLY, False, True),
                                            (HiResFixOption.BOTH, True, True)]:
        ctrl = controller([PreparedUnit(unit(hr_option=option), controlnet, data["hint"])], hires_fix=True)
        assert not torch.equal(hooked_output(unet, ctrl, data), plain) == low_active
        ctrl.set_pass(True, 64, 64)
        assert not torch.equal(hooked_output(unet, ctrl, data), plain) == high_active


def test_model_for_another_base_is_refused(sd15):
    unet, _, _, data = sd15
    _, sdxl_controlnet = diffusers_pair("sdxl")
    ctrl = controller([PreparedUnit(unit(model="xl-canny"), sdxl_controlnet, data["hint"])])
    with pytest.raises(ControlError, match="another base model"):
        with host.hooked(unet, ctrl):
            pass
    assert not unet._forward_pre_hooks


@pytest.mark.parametrize("failure", [RuntimeError("boom"), KeyboardInterrupt()])
def test_diffusers_hook_gone_after_failure_and_wrappers_still_run(sd15, failure):
    unet, controlnet, _, data = sd15
    before = unet_with(unet, data)
    ran = []
    handle = unet.register_forward_hook(lambda m, a, o: ran.append("their hook"))
    try:
        with pytest.raises(type(failure)):
            with host.hooked(unet, controller([PreparedUnit(unit(), controlnet, data["hint"])])):
                unet_with(unet, data)
                raise failure
    finally:
        handle.remove()
    assert ran == ["their hook"]
    assert not unet._forward_pre_hooks and not unet._forward_hooks
    assert torch.equal(unet_with(unet, data), before)


def test_webui_row_layouts():
    layout = RowLayout.webui_cfg([2, 1])  # image 0 has an AND-prompt: two conditional rows
    assert layout.cond == (True, True, True, False, False) and layout.image_index == (0, 0, 1, 0, 1)
    assert RowLayout.webui_cfg([1, 1], skip_uncond=True).cond == (True, True)
    edit = RowLayout.webui_cfg([1], is_edit_model=True)
    assert edit.cond == (True, False, False) and edit.image_index == (0, 0, 0)
    assert RowLayout.diffusers_cfg(2).cond == (False, False, True, True)


def test_low_vram_unit_gives_the_same_result(sd15):
    unet, controlnet, _, data = sd15
    normal = hooked_output(unet, controller([PreparedUnit(unit(), controlnet, data["hint"])]), data)
    low = hooked_output(unet, controller([PreparedUnit(unit(low_vram=True), controlnet, data["hint"])]), data)
    assert torch.equal(normal, low)
    assert controlnet.device.type == "cpu"  # back on the offload device
