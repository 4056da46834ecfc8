"""T2I-Adapter style model: a tiny random file in TencentARC's key layout (`style_embedding`, `transformer_layes.N`,
`ln_pre`, `ln_post`, `proj`) and a tiny CLIP tower saved as `clip_vitl.pth`; our hooked UNets (diffusers' and the
WebUI's ldm) against the definition written out here: the style network on CLIP's last hidden states, and the UNet
run on a context of [text, weight * style tokens] for the conditional row and [text, its last tokens again] for the
unconditional row, as TencentARC's sampler builds it."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from annotator_settings import annotator_folder
from control_fixtures import diffusers_pair, inputs, ldm_unet_like, unit
from annotators import clip_vision
from lib_controlnet.control import ControlError, ControlJob, Controller, PreparedUnit, RowLayout
from lib_controlnet.hosts import diffusers as diffusers_host, ldm as ldm_host
from lib_controlnet.models import ModelFileError, kind_of_file, load_control_model

pytestmark = pytest.mark.usefixtures("one_torch_thread", "no_grad")
WIDTH, TOKENS, DEPTH, HEADS = 32, 4, 2, 8  # HEADS: TencentARC's, not in the file


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("annotators")
    clip_vision.random_encoder_file(root, "clip_vitl", hidden_size=WIDTH, projection_dim=24)
    unet, _ = diffusers_pair("sd15")
    state = _style_state(unet.config.cross_attention_dim)
    path = root / "t2iadapter_style_sd14v1.pth"
    torch.save(state, path)
    with annotator_folder(str(root)):
        yield dict(unet=unet, ldm=ldm_unet_like(unet, "sd15"), data=inputs("sd15"), state=state, path=path)


def _style_state(context_dim: int, seed: int = 3) -> dict:
    g = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=0.3):
        return torch.randn(*shape, generator=g) * scale

    state = {"style_embedding": rand(1, TOKENS, WIDTH, scale=1.0), "proj": rand(WIDTH, context_dim, scale=0.5)}
    for norm in ("ln_pre", "ln_post"):
        state[f"{norm}.weight"], state[f"{norm}.bias"] = 1 + rand(WIDTH, scale=0.1), rand(WIDTH, scale=0.1)
    for i in range(DEPTH):
        block = {"attn.in_proj_weight": rand(3 * WIDTH, WIDTH), "attn.in_proj_bias": rand(3 * WIDTH),
                 "attn.out_proj.weight": rand(WIDTH, WIDTH), "attn.out_proj.bias": rand(WIDTH),
                 "ln_1.weight": 1 + rand(WIDTH, scale=0.1), "ln_1.bias": rand(WIDTH, scale=0.1),
                 "mlp.c_fc.weight": rand(4 * WIDTH, WIDTH), "mlp.c_fc.bias": rand(4 * WIDTH),
                 "mlp.c_proj.weight": rand(WIDTH, 4 * WIDTH), "mlp.c_proj.bias": rand(WIDTH),
                 "ln_2.weight": 1 + rand(WIDTH, scale=0.1), "ln_2.bias": rand(WIDTH, scale=0.1)}
        state.update({f"transformer_layes.{i}.{k}": v for k, v in block.items()})
    return state


def _norm(x, state, name):
    return F.layer_norm(x, (x.shape[-1],), state[f"{name}.weight"], state[f"{name}.bias"], 1e-5)


def _expected_tokens(state, image):
    """CLIP ViT-L's last hidden states -> [hidden, style_embedding] -> ln_pre -> pre-norm residual attention
    blocks (8 heads, quick-GELU MLP) -> ln_post of the last TOKENS positions -> @ proj."""
    from transformers import CLIPVisionModelWithProjection

    encoder = CLIPVisionModelWithProjection(clip_vision.get_encoder("clip_vitl").config).eval()
    encoder.load_state_dict(torch.load(clip_vision.find_encoder_file("clip_vitl"), weights_only=True))
    hidden = encoder(pixel_values=clip_vision.pixel_values([image], 28)).last_hidden_state
    x = _norm(torch.cat([hidden, state["style_embedding"]], dim=1), state, "ln_pre")
    n, length, head = x.shape[0], x.shape[1], WIDTH // HEADS
    for i in range(DEPTH):
        s = {k[len(f"transformer_layes.{i}."):]: v for k, v in state.items() if k.startswith(f"transformer_layes.{i}.")}
        h = _norm(x, s, "ln_1") @ s["attn.in_proj_weight"].T + s["attn.in_proj_bias"]
        q, k, v = (t.reshape(n, length, HEADS, head).transpose(1, 2) for t in h.chunk(3, dim=-1))
        weights = torch.softmax(q @ k.transpose(-1, -2) / head ** 0.5, dim=-1)
        attended = (weights @ v).transpose(1, 2).reshape(n, length, WIDTH)
        x = x + attended @ s["attn.out_proj.weight"].T + s["attn.out_proj.bias"]
        m = _norm(x, s, "ln_2") @ s["mlp.c_fc.weight"].T + s["mlp.c_fc.bias"]
        x = x + (m * torch.sigmoid(1.702 * m)) @ s["mlp.c_proj.weight"].T + s["mlp.c_proj.bias"]
    return _norm(x[:, -TOKENS:], state, "ln_post") @ state["proj"]


def _image(seed=0):
    return (np.random.RandomState(seed).rand(40, 52, 3) * 255).astype(np.uint8)


def _controller(model, rows=None, **fields):
    fields = dict(dict(module="t2ia_style_clipvision", model="t2iadapter_style_sd14v1"), **fields)
    controller = Controller(ControlJob(units=[PreparedUnit(unit(**fields), model, [_image()])], width=64, height=64,
                                       steps=10))
    controller.begin_step(0, 10, rows or RowLayout.diffusers_cfg(1))
    return controller


def _ldm_call(setup, context=None):
    data = setup["data"]
    return setup["ldm"](data["sample"], data["timestep"].expand(2), context=data["context"] if context is None
                        else context)


def _snapshot(module):
    return {k: v.clone() for k, v in module.state_dict().items()}


def _same(module, snapshot):
    return all(torch.equal(v, snapshot[k]) for k, v in module.state_dict().items()) and not any(
        m._forward_hooks or m._forward_pre_hooks for m in module.modules())


def test_style_tokens_join_cross_attention_of_the_conditional_row(setup):
    unet, data, state = setup["unet"], setup["data"], setup["state"]
    assert kind_of_file(setup["path"]).name == "T2I-Adapter style"
    model = load_control_model(setup["path"])
    tokens = _expected_tokens(state, _image())
    weight = 0.8
    text = data["context"]  # diffusers' rows: uncond, cond
    longer = torch.stack([torch.cat([text[0], text[0, -TOKENS:]]), torch.cat([text[1], weight * tokens[0]])])
    expected = unet(data["sample"], data["timestep"], longer).sample
    plain = unet(data["sample"], data["timestep"], text).sample
    assert (plain - expected).abs().max() > 1e-2  # the style tokens change the output
    before_unet, before_ldm = _snapshot(unet), _snapshot(setup["ldm"])

    with diffusers_host.hooked(unet, _controller(model, weight=weight)):
        got = unet(data["sample"], data["timestep"], text).sample
    assert (got - expected).abs().max() <= 1e-4
    with ldm_host.hooked(setup["ldm"], _controller(model, weight=weight)):
        got_ldm = _ldm_call(setup)
    assert (got_ldm - _ldm_call(setup, longer)).abs().max() <= 1e-4
    assert (got_ldm - expected).abs().max() <= 1e-4
    assert _same(unet, before_unet) and _same(setup["ldm"], before_ldm)
    assert torch.equal(unet(data["sample"], data["timestep"], text).sample, plain)


def test_weight_zero_and_outside_start_end_are_the_plain_unet(setup):
    model = load_control_model(setup["path"])
    plain = _ldm_call(setup)
    for fields in (dict(weight=0.0), dict(guidance_start=0.5), dict(guidance_end=0.0, guidance_start=0.0)):
        controller = _controller(model, **fields)
        if fields.get("guidance_end") == 0.0:
            controller.begin_step(5, 10, RowLayout.diffusers_cfg(1))
        with ldm_host.hooked(setup["ldm"], controller):
            assert torch.equal(_ldm_call(setup), plain), fields
    with ldm_host.hooked(setup["ldm"], _controller(model)):
        assert (_ldm_call(setup) - plain).abs().max() > 1e-3


def test_wrong_preprocessor_base_and_damaged_file_are_one_sentence(setup, tmp_path):
    model = load_control_model(setup["path"])
    plain = _ldm_call(setup)
    with pytest.raises(ControlError, match="needs the preprocessor t2ia_style_clipvision, not canny"):
        with ldm_host.hooked(setup["ldm"], _controller(model, module="canny")):
            _ldm_call(setup)
    other = dict(setup["state"], proj=setup["state"]["proj"][:, :16].clone())  # 16-wide tokens: another base
    torch.save(other, tmp_path / "t2iadapter_style_sd14v1.pth")
    with pytest.raises(ControlError, match="16-wide tokens but this UNet's text context is 32 wide"):
        with ldm_host.hooked(setup["ldm"], _controller(load_control_model(tmp_path / "t2iadapter_style_sd14v1.pth"))):
            _ldm_call(setup)
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in setup["ldm"].modules())
    assert torch.equal(_ldm_call(setup), plain)
    torch.save({k: v for k, v in setup["state"].items() if k != "ln_post.bias"}, tmp_path / "broken.pth")
    message = str(pytest.raises(ModelFileError, load_control_model, tmp_path / "broken.pth").value)
    assert "T2I-Adapter style model" in message and "ln_post.bias" in message and "\n" not in message


def test_cli_generate_equals_the_pipeline_on_the_longer_context(setup, tmp_path):
    """A user's run: `generate --unit module=t2ia_style_clipvision,model=<file>,image=<png>` against diffusers'
    StableDiffusionPipeline given the context written out: [prompt, weight * style tokens] and [negative prompt,
    its last tokens again]."""
    from diffusers import StableDiffusionPipeline
    from PIL import Image

    from lib_controlnet import tiny_models
    from lib_controlnet.cli import main

    tiny_models.save_tiny_diffusers_base(tmp_path / "base")
    pipe = StableDiffusionPipeline.from_pretrained(tmp_path / "base", safety_checker=None,
                                                   requires_safety_checker=False, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    state = _style_state(pipe.unet.config.cross_attention_dim, seed=4)
    torch.save(state, tmp_path / "t2iadapter_style_sd14v1.pth")
    Image.fromarray(_image(3)).save(tmp_path / "style.png")
    out = tmp_path / "out"
    unit_text = (f"module=t2ia_style_clipvision,model={tmp_path / 't2iadapter_style_sd14v1.pth'},"
                 f"image={tmp_path / 'style.png'},weight=0.8")
    assert main(["generate", "--base", str(tmp_path / "base"), "--prompt", "a red house", "--negative-prompt",
                 "blurry", "--unit", unit_text, "--steps", "2", "--size", "64x64", "--seed", "7", "--out", str(out),
                 "--annotator-dir", str(setup["path"].parent)]) == 0
    ours = np.asarray(Image.open(out / "image-0.png")).astype(int)

    positive, negative = pipe.encode_prompt("a red house", "cpu", 1, True, "blurry")
    tokens = _expected_tokens(state, _image(3))

    def reference(style):
        return np.asarray(pipe(prompt_embeds=torch.cat([positive, style], dim=1),
                               negative_prompt_embeds=torch.cat([negative, negative[:, -TOKENS:]], dim=1),
                               num_inference_steps=2, width=64, height=64, guidance_scale=7.5,
                               generator=torch.Generator().manual_seed(7)).images[0]).astype(int)

    assert np.abs(ours - reference(0.8 * tokens)).max() <= 1
    assert np.abs(ours - reference(positive[:, -TOKENS:])).max() > 8  # the style shows in the image
    assert "t2ia_style_clipvision" in (out / "infotext.txt").read_text()
