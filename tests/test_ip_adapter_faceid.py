"""IP-Adapter FaceID: identity embeddings from insightface-compatible ONNX models (tiny random ones under
buffalo_l's real file names, tests/fixtures/insightface) run with onnxruntime, and the FaceID adapter with its
LoRA on our hooked UNets against diffusers' `_load_ip_adapter_weights` path with the LoRA merged into the
attention weights (W + up @ down, the LoRA's definition; diffusers would need peft to load it)."""
import copy
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from annotator_settings import annotator_folder
from control_fixtures import diffusers_pair, inputs, ldm_unet_like, unit
from annotators import face_embedding
from lib_controlnet import tiny_models
from lib_controlnet.control import ControlError, ControlJob, Controller, PreparedUnit, RowLayout
from lib_controlnet.hosts import diffusers as diffusers_host, ldm as ldm_host
from lib_controlnet.ip_attention import attention_layers
from lib_controlnet.models.kinds.base_unet import ldm_modules
from lib_controlnet.models import kind_of_file, load_control_model
from lib_controlnet.settings import get_settings, update_settings

pytestmark = pytest.mark.usefixtures("one_torch_thread", "no_grad")
FIXTURES = Path(__file__).parent / "fixtures" / "insightface" / "buffalo_l"


@pytest.fixture(scope="module")
def annotator_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("annotators")
    shutil.copytree(FIXTURES, root / "insightface" / "models" / "buffalo_l")  # the other extension's layout
    with annotator_folder(str(root)):
        yield root


@pytest.fixture(scope="module")
def photo():
    from skimage import data

    return np.ascontiguousarray(data.astronaut()[::4, ::4])


def test_face_embedding_from_the_onnx_models(annotator_dir, photo):
    first = face_embedding.embed([photo, photo[:, ::-1]])
    assert first.shape == (2, 512) and np.allclose(np.linalg.norm(first, axis=1), 1.0, atol=1e-5)
    np.testing.assert_array_equal(face_embedding.embed([photo]), first[:1])
    faces = face_embedding.detect(face_embedding._session(face_embedding.find_models()[0]), photo)
    scores = [score for score, _, _ in faces]
    assert scores == sorted(scores, reverse=True) and all(s >= 0.5 for s in scores)
    # the alignment is the least-squares similarity: a scaled, turned, shifted template comes back exactly
    turn = np.array([[np.cos(0.3), -np.sin(0.3)], [np.sin(0.3), np.cos(0.3)]])
    moved = face_embedding.ARCFACE_TEMPLATE @ (1.7 * turn).T + [12.0, -5.0]
    matrix = face_embedding.similarity_transform(moved, face_embedding.ARCFACE_TEMPLATE)
    np.testing.assert_allclose(moved @ matrix[:, :2].T + matrix[:, 2], face_embedding.ARCFACE_TEMPLATE, atol=1e-4)


def test_missing_face_models_are_one_sentence(tmp_path):
    saved = get_settings().annotator_models_path
    update_settings(annotator_models_path=str(tmp_path))
    try:
        with pytest.raises(Exception) as error:
            face_embedding.find_models()
    finally:
        update_settings(annotator_models_path=saved)
    message = str(error.value)
    assert "det_10g.onnx" in message and "w600k_r50.onnx" in message and str(tmp_path) in message
    assert message.count(". ") == 0


def test_faceid_with_lora_equals_diffusers_with_the_lora_merged(annotator_dir, photo, tmp_path):
    unet, _ = diffusers_pair("sd15")
    data = inputs("sd15")
    state = tiny_models.random_ip_adapter_state(unet, "faceid", embed_dim=512)
    torch.save(state, tmp_path / "ip-adapter-faceid_sd15.bin")
    assert kind_of_file(tmp_path / "ip-adapter-faceid_sd15.bin").name == "IP-Adapter"  # not Control-LoRA
    adapter = load_control_model(tmp_path / "ip-adapter-faceid_sd15.bin")

    reference = copy.deepcopy(unet)
    for n, attention in enumerate(attention_layers(ldm_modules(reference), ("attn1", "attn2"))):
        for part, linear in (("q", attention.to_q), ("k", attention.to_k), ("v", attention.to_v),
                             ("out", attention.to_out[0])):
            linear.weight += (state["ip_adapter"][f"{n}.to_{part}_lora.up.weight"]
                              @ state["ip_adapter"][f"{n}.to_{part}_lora.down.weight"])
    reference._load_ip_adapter_weights([state])
    face = torch.from_numpy(face_embedding.embed([photo]))
    embeds = torch.cat([torch.zeros_like(face), face]).unsqueeze(1)  # FaceID's unconditional side: zeros
    expected = reference(data["sample"], data["timestep"], data["context"],
                         added_cond_kwargs={"image_embeds": [embeds]}).sample

    def controller(**fields):
        prepared = PreparedUnit(unit(**dict(dict(module="ip-adapter_face_id", model="faceid"), **fields)), adapter,
                                [photo])
        job = Controller(ControlJob(units=[prepared], width=64, height=64, steps=10))
        job.begin_step(0, 10, RowLayout.diffusers_cfg(1))
        return job

    plain = unet(data["sample"], data["timestep"], data["context"]).sample
    with diffusers_host.hooked(unet, controller()):
        got = unet(data["sample"], data["timestep"], data["context"]).sample
    assert (got - expected).abs().max() <= 1e-4 and (plain - expected).abs().max() > 1e-2
    ldm = ldm_unet_like(unet, "sd15")
    with ldm_host.hooked(ldm, controller()):
        got_ldm = ldm(data["sample"], data["timestep"].expand(2), context=data["context"])
    assert (got_ldm - expected).abs().max() <= 1e-4
    with ldm_host.hooked(ldm, controller(weight=0.0)):  # weight 0: neither image prompt nor LoRA
        assert torch.equal(ldm(data["sample"], data["timestep"].expand(2), context=data["context"]),
                           ldm(data["sample"], data["timestep"].expand(2), context=data["context"]))
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in ldm.modules())
    assert torch.equal(unet(data["sample"], data["timestep"], data["context"]).sample, plain)
    with pytest.raises(ControlError, match="needs the preprocessor ip-adapter_face_id"):
        with ldm_host.hooked(ldm, controller(module="ip-adapter_clip_h")):
            ldm(data["sample"], data["timestep"].expand(2), context=data["context"])
