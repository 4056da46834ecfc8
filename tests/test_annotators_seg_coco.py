"""seg_ofcoco: transformers' OneFormer from a save_pretrained folder with COCO panoptic's 133 labels (random weights
at reduced size), painted in COCO panoptic's colours as the other extension paints them."""
import cv2
import numpy as np
import pytest
import skimage.data
import torch

from annotators import random_weights, runtime
from annotators.coco_palette import COCO_PANOPTIC_COLORS
from lib_controlnet import preprocess
from lib_controlnet.errors import UserError

IMAGE = cv2.resize(skimage.data.coffee(), (96, 64), interpolation=cv2.INTER_AREA)


def test_registered_and_missing_folder_is_one_sentence(annotator_dir):
    pre = preprocess.get_preprocessor("seg_ofcoco")
    assert pre.name == "oneformer_coco" and pre.control_type == "Segmentation"
    assert "seg_ofcoco" in preprocess.control_types()["Segmentation"]["module_list"]
    with pytest.raises(UserError, match="needs the weight file oneformer_coco_swin_large: put it in .*"
                                        "shi-labs/oneformer_coco_swin_large"):
        preprocess.run("seg_ofcoco", IMAGE)


def test_coco_classes_in_coco_colours(annotator_dir):
    folder = random_weights.write_oneformer_coco(annotator_dir)
    out = preprocess.run("seg_ofcoco", IMAGE, resolution=64, use_cache=False)
    assert out.shape == (64, 96, 3)
    assert {tuple(c) for c in np.unique(out.reshape(-1, 3), axis=0)} <= set(COCO_PANOPTIC_COLORS)
    # a class head that always says class 132 ("rug-merged", a stuff class ADE20K's palette lacks): all its colour
    weights = torch.load(folder / "pytorch_model.bin", weights_only=True)
    bias = torch.full_like(weights["model.transformer_module.decoder.class_embed.bias"], -1e4)
    bias[132] = 1e4
    weights["model.transformer_module.decoder.class_embed.bias"] = bias
    torch.save(weights, folder / "pytorch_model.bin")
    runtime.unload_all()
    rug = preprocess.run("seg_ofcoco", IMAGE, resolution=64, use_cache=False)
    assert (rug == np.array([250, 141, 255], np.uint8)).all()
