"""IP-Adapter FaceID plus / plus v2 and ip-adapter-auto: the identity embedding from insightface-compatible ONNX
models (tiny random ones under buffalo_l's real names) and CLIP's hidden states of the face aligned to 224x224
(a tiny tower saved as clip_h.pth), through the FaceID plus projection, on our hooked UNets against diffusers'
`_load_ip_adapter_weights` path (IPAdapterFaceIDPlusImageProjection, its `clip_embeds` and `shortcut`), with the
file's LoRA merged into the reference's attention weights (W + up @ down)."""
import copy
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from annotator_settings import annotator_folder
from control_fixtures import diffusers_pair, inputs, ldm_unet_like, unit
from annotators import clip_vision, face_embedding
from lib_controlnet import tiny_models
from lib_controlnet.control import ControlError, ControlJob, Controller, PreparedUnit, RowLayout
from lib_controlnet.control_forward import added_embedding_input
from lib_controlnet.hosts import diffusers as diffusers_host, ldm as ldm_host
from lib_controlnet.ip_attention import _encoder_name, attention_layers
from lib_controlnet.models import load_control_model
from lib_controlnet.models.kinds.base_unet import ldm_modules

pytestmark = pytest.mark.usefixtures("one_torch_thread", "no_grad")
FIXTURES = Path(__file__).parent / "fixtures" / "insightface" / "buffalo_l"
CLIP_WIDTH = 32  # the tiny tower's hidden width (ViT-H's is 1280)


@pytest.fixture(scope="module")
def annotator_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("annotators")
    shutil.copytree(FIXTURES, root / "insightface" / "models" / "buffalo_l")
    clip_vision.random_encoder_file(root, "clip_h", hidden_size=CLIP_WIDTH, projection_dim=1024)
    with annotator_folder(str(root)):
        yield root


@pytest.fixture(scope="module")
def photo():
    from skimage import data

    return np.ascontiguousarray(data.astronaut()[::4, ::4])


def _controller(adapter, images, module="ip-adapter_face_id_plus", **fields):
    prepared = PreparedUnit(unit(module=module, model="faceid-plus", **fields), adapter, images)
    job = Controller(ControlJob(units=[prepared], width=64, height=64, steps=10))
    job.begin_step(0, 10, RowLayout.diffusers_cfg(1))
    return job


def _aligned_face(photo):
    """The definition: insightface's norm_crop at 224 (skimage's similarity estimate from the five keypoints onto
    ArcFace's template doubled, then OpenCV's warp with a black border)."""
    from skimage.transform import SimilarityTransform

    detector = face_embedding._session(face_embedding.find_models()[0])
    points = face_embedding.detect(detector, photo)[0][2]
    transform = SimilarityTransform()
    transform.estimate(points, face_embedding.ARCFACE_TEMPLATE * 2)
    return cv2.warpAffine(photo, transform.params[:2], (224, 224), borderValue=0.0)


def _reference(unet, state, data, photo):
    """diffusers' path: the UNet with the file's LoRA merged and its FaceID plus processors, fed the identity
    rows (zeros, face) and the CLIP rows (blank, aligned face); returns a call taking the v2 shortcut flag."""
    reference = copy.deepcopy(unet)
    for n, attention in enumerate(attention_layers(ldm_modules(reference), ("attn1", "attn2"))):
        for part, linear in (("q", attention.to_q), ("k", attention.to_k), ("v", attention.to_v),
                             ("out", attention.to_out[0])):
            linear.weight += (state["ip_adapter"][f"{n}.to_{part}_lora.up.weight"]
                              @ state["ip_adapter"][f"{n}.to_{part}_lora.down.weight"])
    reference._load_ip_adapter_weights([state])
    projection = reference.encoder_hid_proj.image_projection_layers[0]
    cond, uncond = clip_vision.encode(clip_vision.get_encoder("clip_h"), [_aligned_face(photo)], hidden_states=True)
    projection.clip_embeds = torch.cat([uncond, cond]).unsqueeze(1)  # (rows, images, patches, width)
    face = torch.from_numpy(face_embedding.embed([photo]))
    added = dict(data.get("added") or {}, image_embeds=[torch.cat([torch.zeros_like(face), face]).unsqueeze(1)])

    def call(v2: bool):
        projection.shortcut = v2
        return reference(data["sample"], data["timestep"], data["context"], added_cond_kwargs=added).sample

    return call


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_faceid_plus_and_v2_equal_diffusers(family, annotator_dir, photo, tmp_path):
    unet, _ = diffusers_pair(family)
    data = inputs(family)
    ldm = ldm_unet_like(unet, family)
    y = added_embedding_input(unet, **data["added"]) if family == "sdxl" else None
    state = tiny_models.random_ip_adapter_faceid_plus_state(unet, clip_dim=CLIP_WIDTH)
    reference, outputs = _reference(unet, state, data, photo), {}
    for filename, v2 in ((f"ip-adapter-faceid-plus_{family}.bin", False),
                         (f"ip-adapter-faceid-plusv2_{family}.bin", True)):
        torch.save(state, tmp_path / filename)
        adapter = load_control_model(tmp_path / filename)
        assert (adapter.variant, adapter.shortcut, adapter.n_tokens) == ("FaceID plus", v2, 4)
        expected = reference(v2)
        with diffusers_host.hooked(unet, _controller(adapter, [photo])):
            got = unet(data["sample"], data["timestep"], data["context"], added_cond_kwargs=data.get("added")).sample
        assert (got - expected).abs().max() <= 1e-4
        with ldm_host.hooked(ldm, _controller(adapter, [photo], module="ip-adapter-auto")):
            got_ldm = ldm(data["sample"], data["timestep"].expand(2), context=data["context"], y=y)
        assert (got_ldm - expected).abs().max() <= 1e-4
        outputs[v2] = expected
    assert (outputs[True] - outputs[False]).abs().max() > 1e-3  # the shortcut changes the tokens
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in ldm.modules())
    with pytest.raises(ControlError, match="needs the preprocessor ip-adapter_face_id_plus"):
        with ldm_host.hooked(ldm, _controller(adapter, [photo], module="ip-adapter_face_id")):
            ldm(data["sample"], data["timestep"].expand(2), context=data["context"], y=y)


def test_ip_adapter_auto_picks_the_encoder_from_the_keys(annotator_dir, photo, tmp_path):
    """ip-adapter-auto: FaceID and FaceID plus take their face pipelines; CLIP adapters the tower whose output
    width their projection takes (ViT-H 1024-wide embeds or 1280-wide hidden states, ViT-bigG 1280 / 1664)."""
    unet, _ = diffusers_pair("sd15")
    cases = [(tiny_models.random_ip_adapter_state(unet, "faceid", embed_dim=512), "face_id"),
             (tiny_models.random_ip_adapter_faceid_plus_state(unet), "face_id_plus"),
             (tiny_models.random_ip_adapter_state(unet, "base", embed_dim=1024), "clip_h"),
             (tiny_models.random_ip_adapter_state(unet, "base", embed_dim=1280), "clip_g"),
             (tiny_models.random_ip_adapter_state(unet, "plus", embed_dim=1280), "clip_h"),
             (tiny_models.random_ip_adapter_state(unet, "plus", embed_dim=1664), "clip_g")]
    for index, (state, encoder) in enumerate(cases):
        torch.save(state, tmp_path / f"adapter{index}.bin")  # names that say nothing: the keys decide
        adapter = load_control_model(tmp_path / f"adapter{index}.bin")
        prepared = PreparedUnit(unit(module="ip-adapter-auto", model=f"adapter{index}"), adapter, [photo])
        assert _encoder_name(prepared) == encoder
    # end to end, a base adapter on 1024-wide embeds: auto runs what ip-adapter_clip_h runs
    data = inputs("sd15")
    adapter = load_control_model(tmp_path / "adapter2.bin")
    results = []
    for module in ("ip-adapter-auto", "ip-adapter_clip_h"):
        with diffusers_host.hooked(unet, _controller(adapter, [photo], module=module)):
            results.append(unet(data["sample"], data["timestep"], data["context"]).sample)
    assert torch.equal(results[0], results[1])
    assert (results[0] - unet(data["sample"], data["timestep"], data["context"]).sample).abs().max() > 1e-3
