"""Reference-only units (reference_only, reference_adain, reference_adain+attn) on the WebUI's real ldm UNet and
on diffusers' UNet: what they record and read, against the definitions written out here."""
import numpy as np
import pytest
import torch
from PIL import Image

from control_fixtures import diffusers_pair, inputs, ldm_unet_like
from lib_controlnet.control import ControlJob, Controller, PreparedUnit, RowLayout
from lib_controlnet.control_forward import added_embedding_input
from lib_controlnet.hosts import diffusers as diffusers_host
from lib_controlnet.hosts import ldm as ldm_host
from lib_controlnet.reference import ReferenceModel, style_fidelity
from lib_controlnet.unit import ControlMode, ControlUnit

pytestmark = pytest.mark.usefixtures("one_torch_thread", "no_grad")
MODES = ("reference_only", "reference_adain", "reference_adain+attn")
ALPHAS = torch.cumprod(1 - torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000) ** 2, 0)  # SD's scaled-linear
SEED = 11
WEBUI_ROWS = RowLayout((True, False), (0, 0))  # the WebUI batches the conditional row first
UC = [1]


def encode(images):
    """A fixed stand-in for the VAE (the definitions below only need *a* latent): 8x8 means, 4 channels."""
    pooled = torch.nn.functional.avg_pool2d(images, 8)
    return torch.cat([pooled, pooled.mean(dim=1, keepdim=True)], dim=1) * 2 - 1


@pytest.fixture(scope="module", params=["sd15", "sdxl"])
def pair(request):
    family = request.param
    unet, _ = diffusers_pair(family)
    return family, unet, ldm_unet_like(unet, family), inputs(family, size=16)


def controller(data, module, **fields):
    unit = ControlUnit(module=module, **fields)
    hint = data["hint"]
    job = ControlJob(units=[PreparedUnit(unit, ReferenceModel(module), hint)], width=hint.shape[-1],
                     height=hint.shape[-2], steps=10, encode_latent=encode, alphas_cumprod=ALPHAS,
                     reference_seed=SEED)
    control = Controller(job)
    control.begin_step(0, 10, WEBUI_ROWS)
    return control


def ldm_call(family, unet, ldm_unet, data, sample=None):
    extra = {"y": added_embedding_input(unet, **data["added"])} if family == "sdxl" else {}
    sample = data["sample"] if sample is None else sample
    return ldm_unet(sample, data["timestep"].expand(sample.shape[0]), context=data["context"], **extra)


def diffusers_call(family, unet, data):
    added = dict(added_cond_kwargs=data["added"]) if family == "sdxl" else {}
    return unet(data["sample"], data["timestep"], data["context"], **added).sample


def noised_reference(data):
    """The reference pass's input, by its definition: the reference latent noised to the call's timestep."""
    latent = encode(data["hint"])
    noise = torch.randn(latent.shape, generator=torch.Generator().manual_seed(SEED))
    a = ALPHAS[int(data["timestep"].round())]
    return (a.sqrt() * latent + (1 - a).sqrt() * noise).expand(data["sample"].shape[0], -1, -1, -1)


def attention(attn, x, context):
    """Multi-head scaled dot-product attention of an ldm CrossAttention, written out."""
    heads = attn.heads
    q, k, v = attn.to_q(x), attn.to_k(context), attn.to_v(context)

    def split(t):
        return t.reshape(t.shape[0], t.shape[1], heads, -1).transpose(1, 2)

    q, k, v = split(q), split(k), split(v)
    weights = torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1)
    out = (weights @ v).transpose(1, 2).reshape(x.shape[0], x.shape[1], -1)
    return attn.to_out(out)


def adain(x, ref, fidelity):
    def stats(t):
        return t.mean(dim=(2, 3), keepdim=True), t.var(dim=(2, 3), keepdim=True, unbiased=False)

    (mean, var), (ref_mean, ref_var) = stats(x), stats(ref)
    out = (x - mean) / var.clamp_min(1e-6).sqrt() * ref_var.clamp_min(1e-6).sqrt() + ref_mean
    out[UC] = fidelity * x[UC] + (1 - fidelity) * out[UC]
    return out


def test_recorded_and_read_attention_follow_the_definition(pair):
    family, unet, ldm_unet, data = pair
    block = next(m for m in ldm_unet.output_blocks.modules() if hasattr(m, "attn1"))
    plain_inputs = []
    handle = block.norm1.register_forward_hook(lambda m, a, out: plain_inputs.append(out))
    ldm_call(family, unet, ldm_unet, data, sample=noised_reference(data))
    reference = plain_inputs.pop()  # attn1's input in a plain pass over the noised reference
    control = controller(data, "reference_only", threshold_a=0.3)
    seen = []
    with ldm_host.hooked(ldm_unet, control):
        after = block.attn1.register_forward_hook(lambda m, a, out: seen.append(out))
        ldm_call(family, unet, ldm_unet, data)
        after.remove()
    handle.remove()
    recorded, x = plain_inputs  # norm1 ran once in the reference pass, once in the real pass
    assert torch.allclose(recorded, reference, atol=1e-5)
    fidelity = 0.3 ** 3 if family == "sdxl" else 0.3
    expected = attention(block.attn1, x, torch.cat([x, recorded], dim=1))
    expected[UC] = fidelity * attention(block.attn1, x[UC], x[UC]) + (1 - fidelity) * expected[UC]
    assert (seen[-1] - expected).abs().max() <= 1e-5


def test_adain_follows_the_definition(pair):
    family, unet, ldm_unet, data = pair
    block = ldm_unet.output_blocks[0]  # weight 0: every AdaIN unit records it
    control = controller(data, "reference_adain", control_mode="My prompt is more important")  # fidelity 0
    raw, final, full_resolution = [], [], []
    with ldm_host.hooked(ldm_unet, control):
        first = block.register_forward_hook(lambda m, a, out: raw.append(out.clone()), prepend=True)  # before ours
        last = block.register_forward_hook(lambda m, a, out: final.append(out))
        end = ldm_unet.output_blocks[-1].register_forward_hook(lambda m, a, out: full_resolution.append(out))
        ldm_call(family, unet, ldm_unet, data)
        first.remove(), last.remove(), end.remove()
    reference, x = raw
    assert len(full_resolution) == 1  # the reference pass stopped after the last block AdaIN reads
    assert (final[-1] - adain(x, reference, 0.0)).abs().max() <= 1e-5
    assert (final[0] - reference).abs().max() == 0  # the reference pass itself is not changed


@pytest.mark.parametrize("module", MODES)
def test_weight_zero_is_the_plain_unet_exactly(pair, module):
    family, unet, ldm_unet, data = pair
    plain = ldm_call(family, unet, ldm_unet, data)
    with ldm_host.hooked(ldm_unet, controller(data, module, weight=0.0)):
        assert torch.equal(ldm_call(family, unet, ldm_unet, data), plain)
    plain = diffusers_call(family, unet, data)
    with diffusers_host.hooked(unet, controller(data, module, weight=0.0)):
        assert torch.equal(diffusers_call(family, unet, data), plain)


@pytest.mark.parametrize("module", MODES)
def test_diffusers_unet_reads_the_reference_as_the_webui_unet(pair, module):
    """diffusers' blocks split differently from ldm's; the hooks sit where the ldm blocks end, so both agree."""
    family, unet, ldm_unet, data = pair
    plain = ldm_call(family, unet, ldm_unet, data)
    with ldm_host.hooked(ldm_unet, controller(data, module)):
        ours_ldm = ldm_call(family, unet, ldm_unet, data)
    with diffusers_host.hooked(unet, controller(data, module)):
        ours_diffusers = diffusers_call(family, unet, data)
    assert (ours_ldm - ours_diffusers).abs().max() <= 1e-5
    assert (ours_ldm - plain).abs().max() > 1e-3


def test_controlnet_is_more_important_keeps_unconditional_rows_plain(pair):
    family, unet, ldm_unet, data = pair
    plain = ldm_call(family, unet, ldm_unet, data)
    control = controller(data, "reference_adain+attn", control_mode="ControlNet is more important")
    with ldm_host.hooked(ldm_unet, control):
        out = ldm_call(family, unet, ldm_unet, data)
    assert (out[UC] - plain[UC]).abs().max() <= 1e-5  # style fidelity 1: the reference acts through CFG only
    assert (out[0] - plain[0]).abs().max() > 1e-3


def test_style_fidelity_as_users_know_it():
    unit = ControlUnit(module="reference_only")
    assert style_fidelity(unit, sdxl=False, hires=False) == 0.5
    assert style_fidelity(unit, sdxl=True, hires=False) == 0.125
    assert style_fidelity(unit, sdxl=False, hires=True) == 0.0
    assert style_fidelity(unit.replace(threshold_a=0.8), sdxl=False, hires=False) == 0.8
    assert style_fidelity(unit.replace(control_mode=ControlMode.CONTROL), sdxl=True, hires=True) == 1.0
    assert style_fidelity(unit.replace(control_mode=ControlMode.PROMPT), sdxl=False, hires=False) == 0.0


class InterruptedException(BaseException):
    """As the WebUI's samplers raise it: not an Exception subclass."""


def _snapshot(module):
    state = {k: v.clone() for k, v in module.state_dict().items()}
    hooks = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in module.modules())
    return state, hooks


def test_unet_bit_identical_after_job_error_and_interrupt(pair):
    family, unet, ldm_unet, data = pair
    before, plain = _snapshot(ldm_unet), ldm_call(family, unet, ldm_unet, data)

    def unchanged():
        state, hooks = _snapshot(ldm_unet)
        assert hooks == before[1] and state.keys() == before[0].keys()
        assert all(torch.equal(state[k], before[0][k]) for k in state)
        assert torch.equal(ldm_call(family, unet, ldm_unet, data), plain)

    with ldm_host.hooked(ldm_unet, controller(data, "reference_adain+attn")):
        ldm_call(family, unet, ldm_unet, data)
    unchanged()
    control = controller(data, "reference_adain+attn")
    control.job.encode_latent = lambda images: torch.zeros(1, 4, 3, 3)  # a latent of the wrong size
    with pytest.raises(Exception, match="reference latent"):
        with ldm_host.hooked(ldm_unet, control):
            ldm_call(family, unet, ldm_unet, data)
    unchanged()

    def interrupt(module, args, output):
        raise InterruptedException

    with pytest.raises(InterruptedException):
        with ldm_host.hooked(ldm_unet, controller(data, "reference_adain+attn")):
            ldm_unet.output_blocks[-1].register_forward_hook(interrupt)  # mid-way through the real pass
            ldm_call(family, unet, ldm_unet, data)
    for block in ldm_unet.output_blocks:
        block._forward_hooks.clear()  # the test's own hook
    unchanged()


def test_reference_and_lllite_units_are_refused_together_before_any_hook(pair):
    from lib_controlnet.control import ControlError
    from lib_controlnet.models.kinds.lllite import LLLITE

    family, unet, ldm_unet, data = pair
    control = controller(data, "reference_only")
    lllite = PreparedUnit(ControlUnit(model="kohya_controllllite_xl_canny"), torch.nn.Module(), data["hint"],
                          _kind=LLLITE)
    control.units.append(lllite)
    hooks = _snapshot(ldm_unet)[1]
    for host, model in ((ldm_host, ldm_unet), (diffusers_host, unet)):
        with pytest.raises(ControlError, match="cannot run in the same job as the ControlNet-LLLite unit"):
            with host.hooked(model, control):
                pass
    assert _snapshot(ldm_unet)[1] == hooks and _snapshot(unet)[1] == 0


def test_reference_beside_an_ip_adapter_unit(pair, tmp_path):
    """The usual pairing: IP-Adapter (attn2) and a reference unit (attn1, block statistics) in one job. Both act;
    with the reference at weight 0 the output is the IP-Adapter's alone, exactly; the UNet is clean after."""
    from annotators import clip_vision
    from lib_controlnet import tiny_models
    from lib_controlnet.models import load_control_model
    from lib_controlnet.settings import get_settings, update_settings

    family, unet, ldm_unet, data = pair
    saved = get_settings().annotator_models_path
    update_settings(annotator_models_path=str(tmp_path))
    clip_vision.random_encoder_file(tmp_path, "clip_h", hidden_size=32, projection_dim=24)
    clip_vision._cache.clear()
    try:
        torch.save(tiny_models.random_ip_adapter_state(unet, "base", embed_dim=24), tmp_path / "ip-adapter.bin")
        adapter = load_control_model(tmp_path / "ip-adapter.bin")
        photo = (np.random.RandomState(1).rand(40, 52, 3) * 255).astype(np.uint8)

        def run(*units):
            control = controller(data, "reference_adain+attn")
            control.units = list(units)
            with ldm_host.hooked(ldm_unet, control):
                return ldm_call(family, unet, ldm_unet, data)

        def ip():
            return PreparedUnit(ControlUnit(module="ip-adapter_clip_h", model="ipa"), adapter, [photo])

        def ref(weight):
            return controller(data, "reference_adain+attn", weight=weight).units[0]

        plain, hooks = ldm_call(family, unet, ldm_unet, data), _snapshot(ldm_unet)[1]
        ip_only, both = run(ip()), run(ip(), ref(1.0))
        assert (ip_only - plain).abs().max() > 1e-3 and (both - ip_only).abs().max() > 1e-3
        assert torch.equal(run(ip(), ref(0.0)), ip_only)
        assert _snapshot(ldm_unet)[1] == hooks and torch.equal(ldm_call(family, unet, ldm_unet, data), plain)
    finally:
        clip_vision._cache.clear()
        update_settings(annotator_models_path=saved)


# ---------------------------------------------------------------- end to end, as a user runs it


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    from lib_controlnet import tiny_models

    root = tmp_path_factory.mktemp("reference")
    tiny_models.save_tiny_diffusers_base(root / "base")
    image = (np.random.RandomState(0).rand(64, 64, 3) * 255).astype(np.uint8)
    Image.fromarray(image).save(root / "reference.png")
    return root


def test_cli_generate_with_a_reference_unit(files, tmp_path):
    from lib_controlnet.cli import main
    from lib_controlnet.infotext import parse_infotext, units_from_params

    def run(out, unit):
        assert main(["generate", "--base", str(files / "base"), "--prompt", "a red house", "--unit", unit,
                     "--steps", "2", "--size", "64x64", "--seed", "3", "--out", str(tmp_path / out)]) == 0
        return np.asarray(Image.open(tmp_path / out / "image-0.png")).astype(int)

    unit = f"module=reference_adain+attn,image={files / 'reference.png'},a=0.7"
    off = run("off", unit + ",weight=0")
    on, again = run("on", unit), run("again", unit)
    assert np.abs(on - off).max() > 0 and np.array_equal(on, again)
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(files / "base", safety_checker=None, requires_safety_checker=False,
                                                   local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    plain = pipe("a red house", num_inference_steps=2, width=64, height=64, guidance_scale=7.5,
                 generator=torch.Generator().manual_seed(3)).images[0]
    assert np.array_equal(off, np.asarray(plain).astype(int))  # weight 0: the plain pipeline's image
    infotext = (tmp_path / "on" / "infotext.txt").read_text()
    restored = units_from_params(parse_infotext(infotext)[2])[0]
    assert (restored.module, restored.model, restored.threshold_a) == ("reference_adain+attn", "None", 0.7)


def test_reference_modules_are_listed_as_the_other_extension_lists_them():
    from lib_controlnet.ui import catalog

    detail = catalog.module_detail()
    for module in MODES:
        assert detail[module]["model_free"] is True
        assert detail[module]["sliders"][1] == {"name": "Style Fidelity (only for Balanced mode)", "value": 0.5,
                                                "min": 0.0, "max": 1.0, "step": 0.01}
    reference = catalog.control_types()["Reference"]
    assert reference["module_list"] == ["none", *MODES] and reference["default_option"] == "reference_only"
    assert reference["model_list"][0] == "None"
