"""T2I-Adapter: files in the layouts users download load by their keys; control through the unit, controller and
both hosts equals diffusers' adapter path (T2IAdapter / MultiAdapter features into the UNet's
`down_intrablock_additional_residuals`, as StableDiffusionAdapterPipeline runs it)."""
import pytest
import torch
from safetensors.torch import save_file

from control_fixtures import diffusers_pair, inputs, ldm_unet_like, unit
from lib_controlnet.control import ControlError, ControlJob, Controller, PreparedUnit, RowLayout
from lib_controlnet.control_forward import added_embedding_input
from lib_controlnet.hosts import diffusers as diffusers_host
from lib_controlnet.hosts import ldm as ldm_host
from lib_controlnet.models import ModelFileError, kind_of_file, load_control_model
from lib_controlnet.models.kinds import T2I_ADAPTER

pytestmark = pytest.mark.usefixtures("one_torch_thread", "no_grad")


def _adapter(seed, **config):
    from diffusers import T2IAdapter

    torch.manual_seed(seed)
    return T2IAdapter(**config).eval()


def tencentarc_layout(state: dict, per_level: int, light: bool) -> dict:
    """diffusers' names -> the names of TencentARC's released .pth files (written out here, not loader code):
    full: conv_in, flat body.{level * per_level + j}.{block1,block2}, in_conv on each level's first block;
    light: body.{level}.{in_conv,out_conv}, body.{level}.body.{j}.{block1,block2}."""
    out = {}
    for key, tensor in state.items():
        parts = key.split(".")[1:]  # drop "adapter"
        if parts[0] == "conv_in":
            out[".".join(parts)] = tensor
        elif light and parts[2] == "resnets":
            out[f"body.{parts[1]}.body.{parts[3]}.{'.'.join(parts[4:])}"] = tensor
        elif light:
            out[".".join(parts)] = tensor
        elif parts[2] == "resnets":
            out[f"body.{int(parts[1]) * per_level + int(parts[3])}.{'.'.join(parts[4:])}"] = tensor
        else:  # in_conv
            out[f"body.{int(parts[1]) * per_level}.{'.'.join(parts[2:])}"] = tensor
    return out


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """The three layouts: TencentARC full .pth (SD1.5), TencentARC light one-channel .safetensors (SD1.5, as the
    sketch adapters take a gray map), and a diffusers folder (SDXL, as TencentARC publishes its XL adapters)."""
    root = tmp_path_factory.mktemp("adapters")
    full = _adapter(11, in_channels=3, channels=[32, 32, 64, 64], num_res_blocks=2, adapter_type="full_adapter")
    torch.save(tencentarc_layout(full.state_dict(), 2, light=False), root / "t2iadapter_depth_sd14v1.pth")
    light = _adapter(12, in_channels=1, channels=[32, 32, 64], num_res_blocks=2, adapter_type="light_adapter")
    save_file(tencentarc_layout(light.state_dict(), 2, light=True), str(root / "t2iadapter_sketch_light.safetensors"))
    xl = _adapter(13, in_channels=3, channels=[32, 64, 64, 64], num_res_blocks=2, downscale_factor=16,
                  adapter_type="full_adapter_xl")
    xl.save_pretrained(root / "t2i-adapter-canny-sdxl-1.0", safe_serialization=True)
    return {"full": (root / "t2iadapter_depth_sd14v1.pth", full, "sd15"),
            "light": (root / "t2iadapter_sketch_light.safetensors", light, "sd15"),
            "xl": (root / "t2i-adapter-canny-sdxl-1.0", xl, "sdxl")}


@pytest.fixture(scope="module")
def unets():
    out = {}
    for family in ("sd15", "sdxl"):
        unet, _ = diffusers_pair(family)
        out[family] = (unet, ldm_unet_like(unet, family), inputs(family))
    return out


def reference(unet, data, features, family):
    """diffusers' own path: the UNet adds the adapter's (scaled) features itself, repeated to the batch as the
    adapter pipelines do (the SDXL UNet adds its 4th feature after the middle block only when shapes match)."""
    added = dict(added_cond_kwargs=data["added"]) if family == "sdxl" else {}
    batch = data["sample"].shape[0]
    return unet(data["sample"], data["timestep"], data["context"],
                down_intrablock_additional_residuals=[f.repeat(batch, 1, 1, 1) for f in features], **added).sample


def ldm_call(ldm_unet, unet, data, family):
    y = added_embedding_input(unet, **data["added"]) if family == "sdxl" else None
    return ldm_unet(data["sample"], data["timestep"].expand(data["sample"].shape[0]), context=data["context"], y=y)


def gray(hint):
    return (hint * torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(1, keepdim=True)


def controller(model, data, steps=10, **fields):
    return Controller(ControlJob(units=[PreparedUnit(unit(**fields), model, data["hint"])], width=64, height=64,
                                 steps=steps))


@pytest.mark.parametrize("name", ["full", "light", "xl"])
def test_file_is_recognised_and_loads_the_same_weights(files, name):
    path, original, _ = files[name]
    assert kind_of_file(path) is T2I_ADAPTER
    loaded = load_control_model(path)
    assert type(loaded).__name__ == "T2IAdapter" and loaded.config.adapter_type == original.config.adapter_type
    theirs = original.state_dict()
    assert loaded.state_dict().keys() == theirs.keys()
    assert all(torch.equal(v, theirs[k]) for k, v in loaded.state_dict().items())


@pytest.mark.parametrize("name", ["full", "light", "xl"])
def test_both_hosts_equal_diffusers_adapter_path_and_leave_the_unet_unchanged(files, unets, name):
    path, original, family = files[name]
    unet, ldm_unet, data = unets[family]
    hint = gray(data["hint"]) if original.config.in_channels == 1 else data["hint"]
    expected = reference(unet, data, [f * 0.7 for f in original(hint)], family)
    plain = ldm_call(ldm_unet, unet, data, family)
    model = load_control_model(path)
    with ldm_host.hooked(ldm_unet, controller(model, data, weight=0.7)):
        got = ldm_call(ldm_unet, unet, data, family)
    assert (got - expected).abs().max() <= 1e-4
    assert (got - plain).abs().max() > 1e-2
    assert torch.equal(ldm_call(ldm_unet, unet, data, family), plain)
    added = dict(added_cond_kwargs=data["added"]) if family == "sdxl" else {}
    with diffusers_host.hooked(unet, controller(model, data, weight=0.7)):
        got = unet(data["sample"], data["timestep"], data["context"], **added).sample
    assert (got - expected).abs().max() <= 1e-4


def test_two_adapters_equal_multiadapter(files, unets):
    from diffusers import MultiAdapter

    unet, _, data = unets["sd15"]
    (_, full, _), (_, light, _) = files["full"], files["light"]
    features = MultiAdapter([full, light])([data["hint"], gray(data["hint"])],
                                           adapter_weights=[0.6, 1.3])
    expected = reference(unet, data, features, "sd15")
    units = [PreparedUnit(unit(weight=0.6), full, data["hint"]), PreparedUnit(unit(weight=1.3), light, data["hint"])]
    with diffusers_host.hooked(unet, Controller(ControlJob(units=units, width=64, height=64, steps=10))):
        got = unet(data["sample"], data["timestep"], data["context"]).sample
    assert (got - expected).abs().max() <= 1e-4


def test_features_once_per_job_and_start_end(files, unets):
    path, original, family = files["full"]
    unet, ldm_unet, data = unets[family]
    model = load_control_model(path)
    runs = []
    handle = model.register_forward_hook(lambda *a: runs.append(1))
    plain = ldm_call(ldm_unet, unet, data, family)
    ctrl = controller(model, data, guidance_start=0.3, guidance_end=0.6)
    with ldm_host.hooked(ldm_unet, ctrl):
        outputs = []
        for step in range(10):
            ctrl.begin_step(step, 10, RowLayout.all_cond(2))
            outputs.append(ldm_call(ldm_unet, unet, data, family))
    handle.remove()
    assert runs == [1]  # the features do not depend on the timestep: one adapter run for ten steps
    for step, out in enumerate(outputs):
        active = 0.3 <= step / 10 <= 0.6
        assert torch.equal(out, plain) != active, step


def test_controlnet_is_more_important_leaves_unconditional_rows_alone(files, unets):
    path, _, family = files["full"]
    unet, ldm_unet, data = unets[family]
    plain = ldm_call(ldm_unet, unet, data, family)
    ctrl = controller(load_control_model(path), data, control_mode="ControlNet is more important")
    with ldm_host.hooked(ldm_unet, ctrl):
        ctrl.begin_step(0, 10, RowLayout.webui_cfg([1]))
        got = ldm_call(ldm_unet, unet, data, family)
    assert torch.equal(got[1], plain[1]) and not torch.equal(got[0], plain[0])


def test_error_inside_the_call_leaves_the_unet_bit_identical(files, unets):
    path, _, family = files["full"]
    unet, ldm_unet, data = unets[family]
    plain = ldm_call(ldm_unet, unet, data, family)

    def explode(module, args):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        with ldm_host.hooked(ldm_unet, controller(load_control_model(path), data)):
            handle = ldm_unet.input_blocks[4].register_forward_pre_hook(explode)
            try:
                ldm_call(ldm_unet, unet, data, family)
            finally:
                handle.remove()
    assert sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in ldm_unet.modules()) == 0
    assert torch.equal(ldm_call(ldm_unet, unet, data, family), plain)


def test_adapter_for_another_base_gets_one_sentence(files, unets):
    unet, ldm_unet, data = unets["sd15"]
    plain = ldm_call(ldm_unet, unet, data, "sd15")
    with pytest.raises(ControlError, match="made for another base model"):
        with ldm_host.hooked(ldm_unet, controller(load_control_model(files["xl"][0]), data)):
            ldm_call(ldm_unet, unet, data, "sd15")
    assert sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in ldm_unet.modules()) == 0
    assert torch.equal(ldm_call(ldm_unet, unet, data, "sd15"), plain)


def test_damaged_and_style_files_get_one_sentence(files, tmp_path):
    state = tencentarc_layout(files["full"][1].state_dict(), 2, light=False)
    state.pop("body.3.block2.weight")
    save_file(state, str(tmp_path / "partial.safetensors"))
    with pytest.raises(ModelFileError, match=r"does not fit the T2I-Adapter architecture .*missing"):
        load_control_model(tmp_path / "partial.safetensors")
    save_file({"style_embedding": torch.zeros(1, 8, 32), "ln_post.weight": torch.zeros(32)},
              str(tmp_path / "t2iadapter_style_sd14v1.safetensors"))
    # a style file runs (tests/test_t2i_style.py); one without its transformer is named, in one sentence
    message = str(pytest.raises(ModelFileError, load_control_model, tmp_path / "t2iadapter_style_sd14v1.safetensors")
                  .value)
    assert "T2I-Adapter style model" in message and "do not fit together" in message and "\n" not in message


def test_kinds_not_run_yet_and_unknown_files_get_one_sentence(tmp_path):
    """The general loader names each kind it recognises by keys but cannot run yet; other files stay refused."""
    cases = {
        "controlnet-union-sdxl-1.0.safetensors": ({"control_add_embedding.linear_1.bias": torch.zeros(4),
                                                   "task_embedding": torch.zeros(6, 32)}, "ControlNet-Union"),
        "control-lora-canny-rank128.safetensors": ({"lora_controlnet": torch.zeros(1)}, "Control-LoRA"),
        "kohya_controllllite_xl_canny.safetensors": ({"lllite_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q"
                                                      ".down.0.weight": torch.zeros(4, 4)}, "ControlNet-LLLite"),
        "vae.safetensors": ({"encoder.conv_in.weight": torch.zeros(4, 3, 3, 3)}, "is not a ControlNet"),
    }
    for name, (state, fragment) in cases.items():
        save_file(state, str(tmp_path / name))
        message = str(pytest.raises(ModelFileError, load_control_model, tmp_path / name).value)
        assert fragment in message and "\n" not in message and message.endswith("."), message
