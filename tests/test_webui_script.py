"""scripts/controlnet.py driven through whole jobs by a stand-in of the WebUI 1.10 `modules`
(tests/webui_standin), on the WebUI's real ldm UNetModel with tiny weights."""
from __future__ import annotations

import base64
import importlib.util
import io
import os
import sys
from contextlib import closing
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
STANDIN = Path(__file__).resolve().parent / "webui_standin"
MODEL_STEM = "control_sd15_canny_tiny"


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # two threads ran the tiny UNet ~25x slower here


@pytest.fixture(scope="module")
def webui(tmp_path_factory):
    """The stand-in WebUI with our script loaded as the WebUI loads it, a tiny SD1.5 ldm UNet as the model
    and a matching ControlNet in the WebUI's models/ControlNet folder."""
    root = tmp_path_factory.mktemp("webui")
    os.environ["CNET_STANDIN_ROOT"] = str(root)
    sys.path.insert(0, str(STANDIN))
    import dataclasses

    from annotators import weights
    from lib_controlnet.settings import get_settings, update_settings

    # the WebUI's settings (downloads on by default among them) stay with these tests, not the ones after
    saved_settings, saved_surface = dataclasses.asdict(get_settings()), weights._surface
    try:
        from control_fixtures import diffusers_pair, ldm_unet_like
        from modules import paths, script_callbacks, scripts, shared

        from lib_controlnet.models import save_controlnet_ldm

        unet, controlnet = diffusers_pair("sd15")
        save_controlnet_ldm(controlnet, Path(paths.models_path) / "ControlNet" / f"{MODEL_STEM}.safetensors",
                            dtype="fp32")

        class Wrapper(torch.nn.Module):
            def __init__(self, diffusion_model):
                super().__init__()
                self.diffusion_model = diffusion_model

        class SDModel:
            context_dim = unet.config.cross_attention_dim
            model = Wrapper(ldm_unet_like(unet, "sd15"))

        shared.sd_model = SDModel()
        script_callbacks.clear_callbacks()
        spec = importlib.util.spec_from_file_location("controlnet_script", ROOT / "scripts" / "controlnet.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)  # what the WebUI's script_loading.load_module does
        classes = [c for c in module.__dict__.values()
                   if isinstance(c, type) and issubclass(c, scripts.Script) and c is not scripts.Script]
        assert len(classes) == 1
        script_callbacks.ui_settings_callback()
        shared.opts.set("control_net_unit_count", 2)
        shared.opts.set("control_net_detected_maps_dir", str(root / "maps"))
        yield dict(root=root, script_class=classes[0], unet=shared.sd_model.model.diffusion_model)
    finally:
        sys.path.remove(str(STANDIN))
        update_settings(**saved_settings)
        weights.use_surface(saved_surface)


@pytest.fixture(scope="module")
def photo():
    from skimage import data

    return np.ascontiguousarray(data.astronaut()[::8, ::8])  # 64x64 real photograph


def _make_script(webui, is_img2img=False):
    import gradio as gr

    script = webui["script_class"]()
    script.is_txt2img, script.is_img2img = not is_img2img, is_img2img
    tab = "img2img" if is_img2img else "txt2img"
    with gr.Blocks():
        for name in ("width", "height"):
            slider = gr.Slider(64, 2048, value=512, elem_id=f"{tab}_{name}")
            script.after_component(slider, elem_id=f"{tab}_{name}")
        controls = script.ui(is_img2img)
    script.args_from, script.args_to = 0, len(controls)
    script.controls = controls
    return script


@pytest.fixture(scope="module")
def txt2img_script(webui):
    return _make_script(webui)


def _model_name():
    from lib_controlnet.models import get_registry

    get_registry().refresh()
    return next(n for n in get_registry().names() if n.startswith(MODEL_STEM))


def _args(script, **unit0):
    from lib_controlnet.ui.unit_args import UNIT_FIELDS

    values = [c.value for c in script.controls]
    for name, value in unit0.items():
        values[UNIT_FIELDS.index(name)] = value
    return values


def _run(script, args, p_class="txt2img", **p_fields):
    from modules import processing, scripts

    cls = processing.StableDiffusionProcessingTxt2Img if p_class == "txt2img" \
        else processing.StableDiffusionProcessingImg2Img
    p = cls(**dict(dict(prompt="a cat", steps=3, width=64, height=64, batch_size=2, cfg_scale=5.0, seed=3),
                   **p_fields))
    p.scripts = scripts.ScriptRunner([script])
    p.script_args = args
    with closing(p):  # as modules/txt2img.py does
        processed = processing.process_images(p)
    return p, processed


def _hooks(unet) -> int:
    return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in unet.modules())


def _unet_output(unet):
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 8, 8, generator=generator)
    context = torch.randn(2, 8, 32, generator=generator)
    with torch.no_grad():
        return unet(x, timesteps=torch.tensor([500, 500]), context=context)


def _pixels(images):
    return np.stack([np.asarray(im, dtype=np.float32) for im in images])


def _canny_unit(photo, **extra):
    return dict(dict(enabled=True, image={"image": photo, "mask": np.zeros_like(photo)}, module="canny",
                     model=_model_name(), processor_res=64), **extra)


# ---------------------------------------------------------------- registration and UI


def test_settings_section_and_mirror(webui):
    from modules import shared

    from lib_controlnet.settings import get_settings
    from lib_controlnet.webui import settings

    keys = [k for k, info in shared.opts.data_labels.items() if info.section == ("control_net", "ControlNet")]
    assert {"control_net_model_dirs", "control_net_annotator_dir", "control_net_unit_count",
            "control_net_model_cache_size", "control_net_preprocessor_cache_size", "control_net_save_detected_maps",
            "control_net_detected_maps_dir", "control_net_allow_annotator_downloads",
            "control_net_annotator_precision"} <= set(keys)
    assert shared.opts.data_labels["control_net_unit_count"].default == 3
    # in the WebUI missing annotator weights download by themselves unless the user turns that off
    assert shared.opts.data_labels["control_net_allow_annotator_downloads"].default is True
    assert settings.sync().allow_annotator_downloads is True
    shared.opts.set("control_net_model_cache_size", 4)  # onchange mirrors at once
    assert get_settings().model_cache_size == 4
    shared.opts.set("control_net_annotator_precision", "float32")
    assert get_settings().annotator_precision == "float32"
    shared.opts.data["control_net_annotator_precision"] = "half"  # a hand-edited config.json
    assert settings.sync().annotator_precision == "auto"
    from annotators import weights  # a missing weight file points WebUI users at this settings section

    assert weights.download_hint().endswith('"Allow preprocessors to download missing weights" in Settings > '
                                            'ControlNet')
    shared.cmd_opts.controlnet_dir = str(webui["root"] / "extra")
    settings.sync()
    assert Path(webui["root"] / "extra") in get_settings().model_dirs
    assert Path(webui["root"] / "models" / "ControlNet") in get_settings().model_dirs
    shared.cmd_opts.controlnet_dir = None


def test_panel_components_and_paste_fields(txt2img_script):
    from lib_controlnet.ui.unit_args import UNIT_FIELDS

    script = txt2img_script
    assert script.title() == "ControlNet"
    from modules import scripts
    assert script.show(False) is scripts.AlwaysVisible and script.show(True) is scripts.AlwaysVisible
    assert len(script.controls) == 2 * len(UNIT_FIELDS)
    keys = [key for _, key in script.infotext_fields]
    assert "ControlNet 0 module" in keys and "ControlNet 1 weight" in keys
    assert script.paste_field_names == keys


def test_api_routes_and_tabs_are_registered(webui):
    from fastapi import FastAPI
    from fastapi.testclient import TestClient
    from modules import script_callbacks

    app = FastAPI()
    script_callbacks.app_started_callback(None, app)
    paths = {route.path for route in app.routes}
    assert {"/controlnet/version", "/controlnet/model_list", "/controlnet/module_list", "/controlnet/control_types",
            "/controlnet/settings", "/controlnet/detect"} <= paths
    client = TestClient(app)
    assert client.get("/controlnet/settings").json() == {"control_net_unit_count": 2}
    assert any(n.startswith(MODEL_STEM) for n in client.get("/controlnet/model_list").json()["model_list"])
    tabs = script_callbacks.ui_tabs_callback()
    titles = [title for _, title, _ in tabs]
    for module, title in (("dataset_tab", "ControlNet Dataset"), ("train_tab", "ControlNet Train")):
        if importlib.util.find_spec(f"lib_controlnet.ui.{module}") is not None:
            assert title in titles
    assert not script_callbacks.errors_reported, script_callbacks.errors_reported


# ---------------------------------------------------------------- jobs


def test_txt2img_job_controls_the_unet_and_leaves_no_trace(webui, txt2img_script, photo):
    unet = webui["unet"]
    before = _unet_output(unet)
    hooks_before = _hooks(unet)
    _, plain = _run(txt2img_script, _args(txt2img_script))
    p, controlled = _run(txt2img_script, _args(txt2img_script, **_canny_unit(photo)))
    _, weightless = _run(txt2img_script, _args(txt2img_script, **_canny_unit(photo, weight=0.0)))

    assert len(plain.images) == 2 and len(controlled.images) == 3  # two images, then the detected map
    assert np.abs(_pixels(controlled.images[:2]) - _pixels(plain.images)).max() > 0
    np.testing.assert_array_equal(_pixels(weightless.images[:2]), _pixels(plain.images))
    from lib_controlnet import preprocess
    np.testing.assert_array_equal(np.asarray(controlled.images[2]),
                                  preprocess.run("canny", photo, resolution=64))
    assert 'ControlNet 0: "Module: canny' in controlled.infotexts[0]
    assert "ControlNet 0" in p.extra_generation_params and "ControlNet 1" not in p.extra_generation_params
    assert _hooks(unet) == hooks_before
    assert torch.equal(_unet_output(unet), before)
    (webui["root"] / "maps" / "1234-unit0-canny-0.png").write_bytes(b"")  # an older version's name: not counted
    saved = sorted(p.name for p in (webui["root"] / "maps").glob("*.png") if p.name[5] == "-")  # saved per settings
    assert saved and saved[-1].endswith(f"-{controlled.seed}-unit0-canny.png")
    _run(txt2img_script, _args(txt2img_script, **_canny_unit(photo)))  # the same seed again adds, never overwrites
    again = sorted(p.name for p in (webui["root"] / "maps").glob("*.png") if p.name[5] == "-")
    assert len(again) == len(saved) + 1 and set(saved) < set(again) and again[-1].startswith(f"{len(saved):05d}-")


def test_reference_unit_needs_no_model_and_leaves_no_trace(webui, txt2img_script, photo, monkeypatch):
    """reference_adain+attn with model None: the loaded model's VAE encodes the photo (images_tensor_to_samples),
    its alphas_cumprod noises it each step; the images change, a repeat gives the same ones, the UNet is clean."""
    from modules import shared

    from lib_controlnet import tiny_models

    vae = tiny_models.tiny_vae()
    model = shared.sd_model
    monkeypatch.setattr(model, "first_stage_model", vae, raising=False)
    monkeypatch.setattr(model, "encode_first_stage", lambda x: vae.encode(x).latent_dist, raising=False)
    monkeypatch.setattr(model, "get_first_stage_encoding", lambda dist: dist.mean * 0.18215, raising=False)
    monkeypatch.setattr(model, "alphas_cumprod", tiny_models.scheduler().alphas_cumprod, raising=False)
    unet = webui["unet"]
    before, hooks_before = _unet_output(unet), _hooks(unet)
    unit = dict(enabled=True, image={"image": photo, "mask": np.zeros_like(photo)}, module="reference_adain+attn",
                model="None", threshold_a=0.25)
    _, plain = _run(txt2img_script, _args(txt2img_script))
    _, referenced = _run(txt2img_script, _args(txt2img_script, **unit))
    _, again = _run(txt2img_script, _args(txt2img_script, **unit))
    assert np.abs(_pixels(referenced.images[:2]) - _pixels(plain.images)).max() > 0
    np.testing.assert_array_equal(_pixels(again.images[:2]), _pixels(referenced.images[:2]))
    assert 'ControlNet 0: "Module: reference_adain+attn, Model: None' in referenced.infotexts[0]
    assert "Threshold A: 0.25" in referenced.infotexts[0]
    hires = dict(enable_hr=True, hr_scale=2.0, batch_size=1)  # the second pass reads a reference encoded at its size
    _, plain_hr = _run(txt2img_script, _args(txt2img_script), **hires)
    _, referenced_hr = _run(txt2img_script, _args(txt2img_script, **unit), **hires)
    assert referenced_hr.images[0].size == (128, 128)
    assert np.abs(_pixels(referenced_hr.images[:1]) - _pixels(plain_hr.images[:1])).max() > 0
    assert _hooks(unet) == hooks_before and torch.equal(_unet_output(unet), before)


def test_batch_layout_split_calls_match_one_call(txt2img_script, photo):
    from modules import shared

    for mode in ("Balanced", "ControlNet is more important"):
        args = _args(txt2img_script, **_canny_unit(photo, control_mode=mode))
        _, together = _run(txt2img_script, args)
        shared.opts.set("batch_cond_uncond", False)
        try:
            _, split = _run(txt2img_script, args)
        finally:
            shared.opts.set("batch_cond_uncond", True)
        np.testing.assert_allclose(_pixels(split.images), _pixels(together.images), atol=1.0)


def test_exception_and_interrupt_unhook(webui, txt2img_script, photo):
    from modules import script_callbacks, shared

    unet = webui["unet"]
    before, hooks_before = _unet_output(unet), _hooks(unet)
    calls = []

    def failing_extension(module, args):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("another extension failed")

    handle = unet.register_forward_pre_hook(failing_extension)
    try:
        with pytest.raises(RuntimeError, match="another extension failed"):
            _run(txt2img_script, _args(txt2img_script, **_canny_unit(photo)))
    finally:
        handle.remove()
    assert _hooks(unet) == hooks_before and torch.equal(_unet_output(unet), before)

    def interrupt(params):
        if params.sampling_step == 1:
            shared.state.interrupted = True

    script_callbacks.on_cfg_denoiser(interrupt)
    try:
        _, processed = _run(txt2img_script, _args(txt2img_script, **_canny_unit(photo)))
    finally:
        script_callbacks.callback_map["callbacks_cfg_denoiser"].pop()
        shared.state.interrupted = False
    assert len(processed.images) == 3
    assert _hooks(unet) == hooks_before and torch.equal(_unet_output(unet), before)


def test_a_controlnet_for_another_base_is_one_sentence_before_anything_loads(webui, txt2img_script, photo):
    from lib_controlnet.errors import UserError
    from modules import shared

    unet = webui["unet"]
    before, hooks_before = _unet_output(unet), _hooks(unet)
    model = type(shared.sd_model)
    model.is_sd1, model.is_sdxl = False, True  # as WebUI 1.10 flags an SDXL checkpoint; this unit's model is SD1.5
    try:
        with pytest.raises(UserError, match="is a ControlNet for SD1.5 and the loaded checkpoint is SDXL"):
            _run(txt2img_script, _args(txt2img_script, **_canny_unit(photo)))
        model.is_sd1, model.is_sdxl = True, False
        _, processed = _run(txt2img_script, _args(txt2img_script, **_canny_unit(photo)))
        assert len(processed.images) == 3
    finally:
        del model.is_sd1, model.is_sdxl
    assert _hooks(unet) == hooks_before and torch.equal(_unet_output(unet), before)


def test_hires_fix_runs_both_passes(webui, txt2img_script, photo):
    from lib_controlnet import preprocess

    first_pass = preprocess.run("canny", photo, resolution=64)
    for option in ("Both", "Low res only", "High res only"):
        _, processed = _run(txt2img_script, _args(txt2img_script, **_canny_unit(photo, hr_option=option)),
                            enable_hr=True, hr_scale=2.0, batch_size=1)
        # the result, the hires-size map, the first-pass map: the other extension's order, which clients index
        assert [im.size for im in processed.images] == [(128, 128), (128, 128), (64, 64)]
        np.testing.assert_array_equal(np.asarray(processed.images[2]), first_pass)
        assert np.asarray(processed.images[1]).std() > 0
    assert _hooks(webui["unet"]) == 0


def test_infotext_pastes_back_into_the_panel(txt2img_script, photo):
    from modules import infotext_utils

    _, processed = _run(txt2img_script, _args(txt2img_script, **_canny_unit(
        photo, weight=0.75, guidance_start=0.1, guidance_end=0.8, control_mode="My prompt is more important",
        pixel_perfect=True)))
    params = infotext_utils.parse_generation_parameters(processed.infotexts[0])
    values = dict(zip([key for _, key in txt2img_script.infotext_fields],
                      infotext_utils.paste_values(txt2img_script.infotext_fields, params)))
    assert values["ControlNet 0 enabled"] is True and values["ControlNet 1 enabled"] is False
    assert values["ControlNet 0 module"] == "canny" and values["ControlNet 0 model"] == _model_name()
    assert values["ControlNet 0 weight"] == 0.75 and values["ControlNet 0 guidance_end"] == 0.8
    assert values["ControlNet 0 control_mode"] == "My prompt is more important"
    assert values["ControlNet 0 pixel_perfect"] is True
    assert values["ControlNet 0 control_type"] == "Canny"
    # the short names some infotexts hold are pasted as the labels the panel lists
    params = infotext_utils.parse_generation_parameters('x\nSteps: 2, Seed: 1, ControlNet 0: "Module: depth, '
                                                        'Model: None, Weight: 0.5"')
    assert params["ControlNet 0 module"] == "depth_midas" and params["ControlNet 0 control_type"] == "Depth"


def test_api_args_and_bad_units(txt2img_script, photo):
    from lib_controlnet.errors import UserError

    buffer = io.BytesIO()
    Image.fromarray(photo).save(buffer, format="PNG")
    unit = {"enabled": True, "module": "canny", "model": _model_name(), "image": base64.b64encode(buffer.getvalue())
            .decode(), "processor_res": 64}
    defaults = _args(txt2img_script)
    _, processed = _run(txt2img_script, [unit] + defaults[1:])
    assert len(processed.images) == 3
    with pytest.raises(UserError, match="guidance_start"):
        _run(txt2img_script, [dict(unit, guidance_start=0.9, guidance_end=0.1)] + defaults[1:])
    with pytest.raises(UserError, match="model"):
        _run(txt2img_script, [dict(unit, model="missing_model")] + defaults[1:])


def test_img2img_unit_follows_the_input_image(webui, photo):
    from lib_controlnet import preprocess

    script = _make_script(webui, is_img2img=True)
    unit = _canny_unit(photo, image=None)
    _, processed = _run(script, _args(script, **unit), p_class="img2img", init_images=[Image.fromarray(photo)],
                        denoising_strength=0.5)
    np.testing.assert_array_equal(np.asarray(processed.images[-1]), preprocess.run("canny", photo, resolution=64))
    other = np.ascontiguousarray(photo[:, ::-1])
    unit = _canny_unit(other, independent_image=True)
    _, processed = _run(script, _args(script, **unit), p_class="img2img", init_images=[Image.fromarray(photo)],
                        denoising_strength=0.5)
    np.testing.assert_array_equal(np.asarray(processed.images[-1]), preprocess.run("canny", other, resolution=64))


def test_batch_folder_gives_each_image_its_own_map(webui, txt2img_script, photo, tmp_path):
    folder = tmp_path / "batch"
    folder.mkdir()
    Image.fromarray(photo).save(folder / "a.png")
    Image.fromarray(np.ascontiguousarray(photo[::-1])).save(folder / "b.png")
    unit = _canny_unit(photo, image=None, batch_image_dir=str(folder))
    _, processed = _run(txt2img_script, _args(txt2img_script, **unit))
    assert len(processed.images) == 4  # two generated, two maps (one per folder image)
    assert not np.array_equal(np.asarray(processed.images[2]), np.asarray(processed.images[3]))


def test_same_images_where_the_webui_has_no_process_before_every_sampling(txt2img_script, photo, monkeypatch):
    """Older WebUIs call process_batch and before_hr but not process_before_every_sampling."""
    from modules import scripts

    args = _args(txt2img_script, **_canny_unit(photo, hr_option="Low res only"))
    _, with_hook = _run(txt2img_script, args, enable_hr=True, batch_size=1)
    monkeypatch.setattr(scripts.ScriptRunner, "process_before_every_sampling", lambda self, p, **kwargs: None)
    _, without = _run(txt2img_script, args, enable_hr=True, batch_size=1)
    assert len(without.images) == len(with_hook.images) == 3  # the image, then the hires and first-pass maps
    np.testing.assert_array_equal(_pixels(without.images[:1]), _pixels(with_hook.images[:1]))


def test_preprocessors_import_after_the_webui_restores_sys_path(tmp_path):
    """The WebUI loads a script with its folder prepended to a *new* sys.path list and puts the old list back
    afterwards, so anything the script added to sys.path is gone when a preprocessor is first used."""
    import subprocess

    program = f"""
import importlib.util, os, sys
sys.path[:] = [p for p in sys.path if os.path.abspath(p or '.') != {str(ROOT)!r}]
sys.path.insert(0, {str(STANDIN)!r})
saved = sys.path
sys.path = [{str(ROOT / 'scripts')!r}] + sys.path
spec = importlib.util.spec_from_file_location("controlnet_script", {str(ROOT / 'scripts' / 'controlnet.py')!r})
spec.loader.exec_module(importlib.util.module_from_spec(spec))
sys.path = saved
from lib_controlnet import preprocess
import numpy as np
print(preprocess.run("canny", np.zeros((64, 64, 3), np.uint8)).shape)
"""
    env = dict(os.environ, CNET_STANDIN_ROOT=str(tmp_path), PYTHONPATH="")
    done = subprocess.run([sys.executable, "-c", program], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "(512, 512, 3)"  # the default preprocessor resolution


def test_sdxl_control_lora_and_lllite_on_an_sd15_checkpoint_are_one_sentence(webui, txt2img_script, photo):
    """Picked in the panel by their "name [hash]" as any model: on an SD1.5 checkpoint each is one sentence before
    the job (as a ControlNet for another base is), and where the WebUI does not flag its checkpoint, one sentence
    when the unit meets the UNet; the UNet stays hook-free and unchanged."""
    from control_fixtures import diffusers_pair, ldm_unet_like
    from kind_files import write_control_lora, write_lllite
    from modules import paths, shared

    from lib_controlnet.errors import UserError
    from lib_controlnet.models import diffusers_to_ldm, get_registry, unet_diffusers_to_ldm

    folder = Path(paths.models_path) / "ControlNet"
    unet, controlnet = diffusers_pair("sdxl")
    own = {k: v for k, v in diffusers_to_ldm(controlnet.state_dict()).items()
           if k.startswith(("input_hint_block.", "zero_convs.", "middle_block_out."))}
    write_control_lora(folder / "control-lora-canny-rank4.safetensors", unet_diffusers_to_ldm(unet.state_dict()), own)
    write_lllite(folder / "kohya_controllllite_xl_canny.safetensors", ldm_unet_like(unet, "sdxl"))
    get_registry().refresh()
    sd15_unet = webui["unet"]
    before, hooks_before = _unet_output(sd15_unet), _hooks(sd15_unet)
    cases = {"control-lora-canny-rank4": ("is a Control-LoRA for SDXL and the loaded checkpoint is SD1.x",
                                          "is a Control-LoRA for SDXL and does not fit the loaded SD1.5 model"),
             "kohya_controllllite_xl_canny": ("is a ControlNet-LLLite for SDXL and the loaded checkpoint is SD1.x",
                                              "is a ControlNet-LLLite model made for another base model")}
    model = type(shared.sd_model)
    for stem, (before_job, in_job) in cases.items():
        name = next(n for n in get_registry().names() if n.startswith(stem))
        for flagged, fragment in ((True, before_job), (False, in_job)):
            if flagged:
                model.is_sd1, model.is_sdxl = True, False  # as WebUI 1.10 flags an SD1.5 checkpoint
            try:
                with pytest.raises(UserError) as error:
                    _run(txt2img_script, _args(txt2img_script, **_canny_unit(photo, model=name)))
            finally:
                if flagged:
                    del model.is_sd1, model.is_sdxl
            assert fragment in str(error.value) and "\n" not in str(error.value), str(error.value)
            assert _hooks(sd15_unet) == hooks_before and torch.equal(_unet_output(sd15_unet), before)


def test_ip_adapter_unit_with_several_images_through_the_api_args(webui, txt2img_script, photo):
    """An IP-Adapter plus unit as the other extension's clients send it: module `ip-adapter_clip_sd15`, the
    model's registry name, `image` a list of {"image", "mask"} (multi-inputs), on the WebUI's ldm UNet."""
    from modules import paths, shared

    from annotators import clip_vision
    from lib_controlnet import tiny_models
    from lib_controlnet.models import get_registry

    unet = webui["unet"]
    torch.save(tiny_models.random_ip_adapter_state(unet, "plus", embed_dim=32),
               Path(paths.models_path) / "ControlNet" / "ip-adapter-plus_sd15.bin")
    clip_vision.random_encoder_file(webui["root"] / "annotators", "clip_h", hidden_size=32, projection_dim=24)
    shared.opts.set("control_net_annotator_dir", str(webui["root"] / "annotators"))
    get_registry().refresh()
    name = next(n for n in get_registry().names() if n.startswith("ip-adapter-plus_sd15"))

    def b64(array):
        buffer = io.BytesIO()
        Image.fromarray(array).save(buffer, format="PNG")
        return base64.b64encode(buffer.getvalue()).decode()

    before, hooks_before = _unet_output(unet), _hooks(unet)
    unit = {"enabled": True, "module": "ip-adapter_clip_sd15", "model": name, "weight": 0.8,
            "image": [{"image": b64(photo), "mask": None}, {"image": b64(photo[::-1].copy()), "mask": None},
                      {"image": b64(photo[:, ::-1].copy())}]}  # three images for a batch of two: averaged
    defaults = _args(txt2img_script)
    _, plain = _run(txt2img_script, _args(txt2img_script))
    _, prompted = _run(txt2img_script, [unit] + defaults[1:])
    _, zero = _run(txt2img_script, [dict(unit, weight=0.0)] + defaults[1:])
    assert len(prompted.images) == 2  # no detected map for an image prompt, as the other extension answers
    assert np.abs(_pixels(prompted.images) - _pixels(plain.images)).max() > 0
    np.testing.assert_array_equal(_pixels(zero.images), _pixels(plain.images))
    assert 'Module: ip-adapter_clip' in prompted.infotexts[0] and "Weight: 0.8" in prompted.infotexts[0]
    assert _hooks(unet) == hooks_before and torch.equal(_unet_output(unet), before)
