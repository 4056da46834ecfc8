"""IP-Adapter: files recognised and loaded by their keys, image tokens from a CLIP tower saved under the other
extension's file name, and our hooked UNets (diffusers', the WebUI's ldm and the sgm-style SDXL layout) against
diffusers' own `load_ip_adapter` path (`_load_ip_adapter_weights` + `image_embeds`) on the same weights."""
import copy

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from annotator_settings import annotator_folder
from control_fixtures import diffusers_pair, inputs, ldm_unet_like, unit
from annotators import clip_vision
from lib_controlnet import tiny_models
from lib_controlnet.control import ControlError, ControlJob, Controller, PreparedUnit, RowLayout
from lib_controlnet.control_forward import added_embedding_input
from lib_controlnet.hosts import diffusers as diffusers_host, ldm as ldm_host
from lib_controlnet.models import ModelFileError, kind_of_file, load_control_model
from lib_controlnet.settings import get_settings, update_settings

pytestmark = pytest.mark.usefixtures("one_torch_thread", "no_grad")
ENCODER_WIDTH, ENCODER_EMBEDS = 32, 24  # the tiny tower's hidden and projection widths


@pytest.fixture(scope="module")
def annotator_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("annotators")
    clip_vision.random_encoder_file(root, "clip_h", hidden_size=ENCODER_WIDTH, projection_dim=ENCODER_EMBEDS)
    with annotator_folder(str(root)):
        yield root


@pytest.fixture(scope="module", params=["sd15", "sdxl"])
def family(request):
    unet, _ = diffusers_pair(request.param)
    return request.param, unet, ldm_unet_like(unet, request.param), inputs(request.param)


def _image(seed=0, size=(40, 52)):
    return (np.random.RandomState(seed).rand(*size, 3) * 255).astype(np.uint8)


def _adapter_file(tmp_path, unet, variant, suffix=".bin", **kw):
    state = tiny_models.random_ip_adapter_state(
        unet, variant, embed_dim=ENCODER_EMBEDS if variant == "base" else ENCODER_WIDTH, **kw)
    path = tmp_path / f"ip-adapter-{variant}{suffix}"
    if suffix == ".bin":
        torch.save(state, path)
    else:
        save_file({f"{group}.{k}": v for group, part in state.items() for k, v in part.items()}, str(path))
    return path, state


def _controller(adapter, images, rows=None, mask=None, **fields):
    fields = dict(dict(module="ip-adapter_clip_h", model="ipa"), **fields)
    prepared = PreparedUnit(unit(**fields), adapter, images, mask=None if mask is None else [mask])
    controller = Controller(ControlJob(units=[prepared], width=64, height=64, steps=10))
    controller.begin_step(0, 10, rows or RowLayout.diffusers_cfg(1))
    return controller


def _reference(unet, state, data, image, hidden_states):
    """diffusers' path: the UNet with the adapter's processors, fed the CLIP output rows (uncond, cond)."""
    from transformers import CLIPVisionModelWithProjection

    encoder = CLIPVisionModelWithProjection(clip_vision.get_encoder("clip_h").config).eval()
    encoder.load_state_dict(torch.load(clip_vision.find_encoder_file("clip_h"), weights_only=True))
    pixels = clip_vision.pixel_values([image], 28)
    output = encoder(pixel_values=torch.cat([torch.zeros_like(pixels), pixels]), output_hidden_states=True)
    if hidden_states:
        embeds = output.hidden_states[-2]
    else:
        embeds = torch.cat([torch.zeros_like(output.image_embeds[:1]), output.image_embeds[1:]])
    reference = copy.deepcopy(unet)
    reference._load_ip_adapter_weights([state])
    added = dict(data.get("added") or {}, image_embeds=[embeds.unsqueeze(1)])
    return reference(data["sample"], data["timestep"], data["context"], added_cond_kwargs=added).sample


def _ldm_call(ldm, family_name, unet, data):
    y = added_embedding_input(unet, **data["added"]) if family_name == "sdxl" else None
    return ldm(data["sample"], data["timestep"].expand(data["sample"].shape[0]), context=data["context"], y=y)


def _snapshot(module):
    return {k: v.clone() for k, v in module.state_dict().items()}


def _same(module, snapshot):
    return all(torch.equal(v, snapshot[k]) for k, v in module.state_dict().items()) and not any(
        m._forward_hooks or m._forward_pre_hooks for m in module.modules())


@pytest.mark.parametrize("variant", ["base", "plus"])
def test_hooked_unets_equal_diffusers_load_ip_adapter(family, annotator_dir, tmp_path, variant):
    name, unet, ldm, data = family
    path, state = _adapter_file(tmp_path, unet, variant, ".safetensors" if variant == "plus" else ".bin")
    adapter = load_control_model(path)
    image = _image()
    expected = _reference(unet, state, data, image, hidden_states=variant != "base")
    before_unet, before_ldm = _snapshot(unet), _snapshot(ldm)
    plain = unet(data["sample"], data["timestep"], data["context"], added_cond_kwargs=data.get("added")).sample

    with diffusers_host.hooked(unet, _controller(adapter, [image])):
        got = unet(data["sample"], data["timestep"], data["context"], added_cond_kwargs=data.get("added")).sample
    assert (got - expected).abs().max() <= 1e-4
    assert (plain - expected).abs().max() > 1e-2  # the image prompt changes the output

    with ldm_host.hooked(ldm, _controller(adapter, [image])):
        got_ldm = _ldm_call(ldm, name, unet, data)
    assert (got_ldm - expected).abs().max() <= 1e-4
    assert _same(unet, before_unet) and _same(ldm, before_ldm)
    assert torch.equal(unet(data["sample"], data["timestep"], data["context"],
                            added_cond_kwargs=data.get("added")).sample, plain)


def test_variants_and_widths_from_keys(tmp_path):
    unet, _ = diffusers_pair("sdxl")
    for variant, suffix in (("base", ".safetensors"), ("plus", ".bin"), ("full-face", ".safetensors")):
        path, _ = _adapter_file(tmp_path, unet, variant, suffix)
        assert kind_of_file(path).name == "IP-Adapter"
        adapter = load_control_model(path, dtype="fp16")
        assert (adapter.variant, adapter.cross_attention_dim, len(adapter.to_k_ip)) == (variant, 64, 11)
        assert adapter.dtype == torch.float16
    face_id_plus = {"image_proj": {"perceiver_resampler.proj_in.weight": torch.zeros(8, 4)},
                    "ip_adapter": {"1.to_k_ip.weight": torch.zeros(4, 4)}}
    torch.save(face_id_plus, tmp_path / "ip-adapter-faceid-plusv2_sd15.bin")
    with pytest.raises(ModelFileError, match="ip-adapter-faceid-plusv2_sd15.bin is an IP-Adapter FaceID plus file "
                                             "without its identity projection"):
        load_control_model(tmp_path / "ip-adapter-faceid-plusv2_sd15.bin")


def test_multi_inputs_average_clip_features_and_encode_once(family, annotator_dir, tmp_path, monkeypatch):
    name, unet, ldm, data = family
    path, _ = _adapter_file(tmp_path, unet, "plus")
    adapter = load_control_model(path)
    images = [_image(1), _image(2, (64, 30))]
    encoder = clip_vision.get_encoder("clip_h")
    cond, uncond = clip_vision.encode(encoder, images, hidden_states=True)
    expected = adapter.tokens(torch.cat([uncond, cond.mean(dim=0, keepdim=True)]))
    calls = []
    real_encode = clip_vision.encode
    monkeypatch.setattr(clip_vision, "encode", lambda *a, **k: calls.append(1) or real_encode(*a, **k))
    controller = _controller(adapter, images)
    with ldm_host.hooked(ldm, controller):
        for step in range(3):
            controller.begin_step(step, 10, RowLayout.diffusers_cfg(1))
            _ldm_call(ldm, name, unet, data)
        embedding = next(iter(controller.units[0]._embeddings.values()))  # the job's cached PromptEmbedding
        assert torch.allclose(embedding.tokens, expected, atol=1e-6)
    assert calls == [1]  # the encoder ran once for the job, not per step


def test_weight_window_and_region(family, annotator_dir, tmp_path):
    name, unet, ldm, data = family
    path, _ = _adapter_file(tmp_path, unet, "base")
    adapter = load_control_model(path)
    plain = _ldm_call(ldm, name, unet, data)
    for fields in (dict(weight=0.0), dict(guidance_start=0.5), dict(mask=np.zeros((64, 64), np.float32))):
        with ldm_host.hooked(ldm, _controller(adapter, [_image()], **fields)):
            assert torch.equal(_ldm_call(ldm, name, unet, data), plain), fields
    left = np.zeros((64, 64), np.float32)
    left[:, :32] = 1.0
    with ldm_host.hooked(ldm, _controller(adapter, [_image()])):
        full = _ldm_call(ldm, name, unet, data)
    with ldm_host.hooked(ldm, _controller(adapter, [_image()], mask=left)):
        masked = _ldm_call(ldm, name, unet, data)
    with ldm_host.hooked(ldm, _controller(adapter, [_image()], weight=0.5)):
        half = _ldm_call(ldm, name, unet, data)
    assert (masked - plain).abs().max() > 1e-3 and (masked - full).abs().max() > 1e-3
    assert (half - plain).abs().max() > 1e-3 and (half - full).abs().max() > 1e-3
    # "ControlNet is more important": the unconditional row runs as if there were no image prompt
    controller = _controller(adapter, [_image()], control_mode="ControlNet is more important",
                             rows=RowLayout.webui_cfg([1]))
    with ldm_host.hooked(ldm, controller):
        out = _ldm_call(ldm, name, unet, data)
    assert torch.equal(out[1], plain[1]) and (out[0] - plain[0]).abs().max() > 1e-3


class Interrupted(BaseException):
    pass


@pytest.mark.parametrize("failure", [RuntimeError, Interrupted])
def test_unet_bit_identical_after_errors_and_interrupts(family, annotator_dir, tmp_path, failure):
    name, unet, ldm, data = family
    path, _ = _adapter_file(tmp_path, unet, "plus")
    adapter = load_control_model(path)
    before_unet, before_ldm = _snapshot(unet), _snapshot(ldm)
    plain = _ldm_call(ldm, name, unet, data)

    def explode(module, args):
        raise failure("stop")

    for host, model, call in ((ldm_host, ldm, lambda: _ldm_call(ldm, name, unet, data)),
                              (diffusers_host, unet, lambda: unet(data["sample"], data["timestep"], data["context"],
                                                                  added_cond_kwargs=data.get("added")))):
        target = model.output_blocks[2] if model is ldm else model.up_blocks[1]
        handle = target.register_forward_pre_hook(explode)
        try:
            with pytest.raises(failure), host.hooked(model, _controller(adapter, [_image()])):
                call()
        finally:
            handle.remove()
    assert _same(unet, before_unet) and _same(ldm, before_ldm)
    assert torch.equal(_ldm_call(ldm, name, unet, data), plain)


def test_adapter_for_another_base_is_one_sentence(family, annotator_dir, tmp_path):
    name, unet, ldm, data = family
    other, _ = diffusers_pair("sdxl" if name == "sd15" else "sd15")
    path, _ = _adapter_file(tmp_path, other, "base")
    with pytest.raises(ControlError, match="was made for another base model"):
        with ldm_host.hooked(ldm, _controller(load_control_model(path), [_image()])):
            pass
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in ldm.modules())


def test_missing_encoder_names_the_file_and_folder(tmp_path):
    saved = get_settings().annotator_models_path
    update_settings(annotator_models_path=str(tmp_path / "empty"))
    clip_vision._cache.clear()
    try:
        with pytest.raises(Exception) as error:
            clip_vision.get_encoder("clip_g")
    finally:
        update_settings(annotator_models_path=saved)
    message = str(error.value)
    assert "clip_g.pth" in message and str(tmp_path / "empty") in message and message.count(". ") == 0


def test_cli_generate_equals_diffusers_pipeline_load_ip_adapter(annotator_dir, tmp_path):
    """A user's run: `generate --unit module=ip-adapter_clip_h,model=<file>,image=<png>` against diffusers'
    StableDiffusionPipeline with `load_ip_adapter` from a local folder (adapter + image_encoder) on the same
    weights. The image has the tower's input size, so their resize-and-crop and our squash are both no-ops."""
    from diffusers import StableDiffusionPipeline
    from PIL import Image

    from lib_controlnet.cli import main

    tiny_models.save_tiny_diffusers_base(tmp_path / "base")
    pipe = StableDiffusionPipeline.from_pretrained(tmp_path / "base", safety_checker=None,
                                                   requires_safety_checker=False, local_files_only=True)
    state = tiny_models.random_ip_adapter_state(pipe.unet, "plus", embed_dim=ENCODER_WIDTH)
    (tmp_path / "ipa").mkdir()
    torch.save(state, tmp_path / "ipa" / "ip-adapter-plus_sd15.bin")
    clip_vision.get_encoder("clip_h").save_pretrained(tmp_path / "ipa" / "image_encoder")
    Image.fromarray(_image(3, (28, 28))).save(tmp_path / "face.png")

    out = tmp_path / "out"
    unit_text = (f"module=ip-adapter_clip_sd15,model={tmp_path / 'ipa' / 'ip-adapter-plus_sd15.bin'},"
                 f"image={tmp_path / 'face.png'},weight=0.8")
    assert main(["generate", "--base", str(tmp_path / "base"), "--prompt", "a red house", "--negative-prompt",
                 "blurry", "--unit", unit_text, "--steps", "2", "--size", "64x64", "--seed", "7", "--out", str(out),
                 "--annotator-dir", str(annotator_dir)]) == 0
    ours = np.asarray(Image.open(out / "image-0.png")).astype(int)

    pipe.load_ip_adapter(str(tmp_path / "ipa"), subfolder="", weight_name="ip-adapter-plus_sd15.bin",
                         image_encoder_folder="image_encoder", local_files_only=True)
    pipe.set_ip_adapter_scale(0.8)
    pipe.set_progress_bar_config(disable=True)

    def reference():
        face = Image.open(tmp_path / "face.png")
        return np.asarray(pipe("a red house", negative_prompt="blurry", ip_adapter_image=face, num_inference_steps=2,
                               width=64, height=64, guidance_scale=7.5,
                               generator=torch.Generator().manual_seed(7)).images[0]).astype(int)

    assert np.abs(ours - reference()).max() <= 1
    pipe.set_ip_adapter_scale(0.0)
    assert np.abs(ours - reference()).max() > 8  # the image prompt shows in the image
    text = (out / "infotext.txt").read_text()
    assert "ip-adapter_clip" in text and "Weight: 0.8" in text
