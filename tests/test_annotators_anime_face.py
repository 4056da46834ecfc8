"""seg_anime_face: the U-Net's real loading code on random weights saved as UNet.pth (DataParallel `module.` keys
and bare ones), its 7-class palette, and the one-sentence errors."""
import cv2
import numpy as np
import pytest
import skimage.data
import torch

from annotators import anime_face, random_weights, runtime
from lib_controlnet import preprocess
from lib_controlnet.errors import UserError

IMAGE = cv2.resize(skimage.data.astronaut(), (96, 128), interpolation=cv2.INTER_AREA)


def test_registered_as_users_know_it():
    pre = preprocess.get_preprocessor("seg_anime_face")
    assert pre.name == "anime_face_segment" and pre.control_type == "Segmentation" and not pre.model_free
    assert pre.sliders() == [{"name": "Resolution", "value": 512, "min": 64, "max": 2048, "step": 8}]
    assert "seg_anime_face" in preprocess.control_types()["Segmentation"]["module_list"]


def test_missing_and_damaged_files_are_one_sentence(annotator_dir):
    with pytest.raises(UserError) as error:
        preprocess.run("seg_anime_face", IMAGE)
    assert "needs the weight file UNet.pth: put it in" in str(error.value)
    assert "bdsqlsz/qinglong_controlnet-lllite (Annotators/UNet.pth)" in str(error.value)
    torch.save({"module.en_block0.0.0.weight": torch.zeros(1)}, annotator_dir / "UNet.pth")
    with pytest.raises(UserError, match=r"cannot be read as the anime-face segmentation UNet.pth \(.*\); replace"):
        preprocess.run("seg_anime_face", IMAGE)


def test_map_in_the_seven_colour_palette_from_either_key_layout(annotator_dir):
    (path,) = random_weights.write(annotator_dir, ["UNet.pth"])
    state = torch.load(path, weights_only=True)
    assert all(k.startswith("module.") for k in state) and "module.de_block0.1.weight" in state
    out = preprocess.run("seg_anime_face", IMAGE, resolution=128, use_cache=False)
    assert out.shape == (171, 128, 3) and out.dtype == np.uint8
    colours = {tuple(c) for c in np.unique(out.reshape(-1, 3), axis=0)}
    assert colours <= {tuple(c) for c in anime_face.PALETTE} and len(colours) > 1
    # bare keys load the same network; a last layer that always says "hair" paints everything hair's blue
    bare = {k[len("module."):]: v for k, v in state.items()}
    bare["de_block0.1.bias"] = torch.tensor([0, 1e6, 0, 0, 0, 0, 0], dtype=torch.float32)
    torch.save(bare, path)
    runtime.unload_all()
    hair = preprocess.run("seg_anime_face", IMAGE, resolution=128, use_cache=False)
    assert (hair == np.array([0, 0, 255], np.uint8)).all()
