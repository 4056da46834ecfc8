"""The heavy neural annotators (MiDaS DPT-Hybrid, LeReS ResNeXt-101 + pix2pix, ZoeDepth BEiT-L, NormalBAE,
OpenPose): real loading code on random weights under the release names, maps equal to controlnet-aux's.

Building these networks takes about two and a half minutes and 8 GB on two cores; set CONTROLNET_SKIP_HEAVY=1
to leave them out of a local run (CI runs them).
"""
import os

import cv2
import numpy as np
import pytest
import skimage.data

from annotator_settings import annotator_folder
from annotators import random_weights, runtime
from annotators.runtime import aux_module
from lib_controlnet import preprocess
from lib_controlnet.settings import update_settings

pytestmark = [pytest.mark.skipif(os.environ.get("CONTROLNET_SKIP_HEAVY") == "1",
                                 reason="CONTROLNET_SKIP_HEAVY=1 leaves out the heavy annotator networks"),
              pytest.mark.timeout(900)]

IMAGE = cv2.resize(skimage.data.astronaut(), (192, 192), interpolation=cv2.INTER_AREA)


@pytest.fixture(scope="module")
def weights_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("heavy_annotators")
    # float32: the precision whose maps equal controlnet-aux's
    with annotator_folder(directory, annotator_precision="float32"):
        yield directory


def _same(ours, theirs, off_by_one: float = 1e-3):
    assert ours.shape == theirs.shape and ours.dtype == theirs.dtype == np.uint8
    diff = np.abs(ours.astype(int) - theirs)
    assert diff.max() <= 1 and (diff > 0).mean() < off_by_one, (diff.max(), (diff > 0).mean())


def _close_in_bfloat16(name, exact, **params):
    """With annotator_precision=bfloat16 the map changes (the network really ran in bfloat16), by a few levels."""
    update_settings(annotator_precision="bfloat16")
    try:
        fast = preprocess.run(name, IMAGE, resolution=192, use_cache=False, **params)
    finally:
        update_settings(annotator_precision="float32")
    diff = np.abs(fast.astype(int) - exact)
    assert 0 < diff.max() <= 8 and diff.mean() < 1.0, (diff.max(), diff.mean())


def test_midas_depth_and_normal_equal_controlnet_aux(weights_dir):
    random_weights.write(weights_dir, ["dpt_hybrid-midas-501f0c75.pt"])
    detector = aux_module("midas").MidasDetector.from_pretrained(str(weights_dir))
    depth, normal = detector(IMAGE, bg_th=0.4, depth_and_normal=True, detect_resolution=192,
                             image_resolution=192, output_type="np")
    _same(preprocess.run("depth_midas", IMAGE, resolution=192, use_cache=False), depth)
    _same(preprocess.run("normal_midas", IMAGE, resolution=192, threshold_a=0.4, use_cache=False), normal)
    _close_in_bfloat16("depth_midas", depth)
    update_settings(annotator_precision="bfloat16")
    try:  # the normal map's Sobel gradients are taken of float32 depth whatever the setting
        _same(preprocess.run("normal_midas", IMAGE, resolution=192, threshold_a=0.4, use_cache=False), normal)
    finally:
        update_settings(annotator_precision="float32")


def test_normal_bae_equals_controlnet_aux(weights_dir):
    random_weights.write(weights_dir, ["scannet.pt"])
    detector = aux_module("normalbae").NormalBaeDetector.from_pretrained(str(weights_dir))
    theirs = detector(IMAGE, detect_resolution=192, image_resolution=192, output_type="np")
    _same(preprocess.run("normal_bae", IMAGE, resolution=192, use_cache=False), theirs)
    from annotators.normalbae_decoder import InferenceDecoder

    net = runtime.load_once("normal_bae", lambda: None)
    assert isinstance(net.decoder, InferenceDecoder)  # the map above came from the reworked decoder
    _close_in_bfloat16("normal_bae", theirs)


def test_leres_equals_controlnet_aux(weights_dir):
    random_weights.write(weights_dir, ["res101.pth", "latest_net_G.pth"])
    detector = aux_module("leres").LeresDetector.from_pretrained(str(weights_dir))
    detector.model.eval()  # controlnet-aux leaves the depth network in training mode (batch-statistics BatchNorm)
    theirs = detector(IMAGE, thr_a=10, thr_b=20, detect_resolution=192, image_resolution=192, output_type="np")
    _same(preprocess.run("depth_leres", IMAGE, resolution=192, threshold_a=10, threshold_b=20,
                         use_cache=False), theirs)
    # without the near/background cut-offs, which send the pixels right at a cut-off to black
    _close_in_bfloat16("depth_leres", preprocess.run("depth_leres", IMAGE, resolution=192, use_cache=False))
    assert preprocess.run("depth_leres++", IMAGE, resolution=192, use_cache=False).shape == (192, 192, 3)


def test_zoe_equals_controlnet_aux(weights_dir):
    random_weights.write(weights_dir, ["ZoeD_M12_N.pt"])
    detector = aux_module("zoe").ZoeDetector.from_pretrained(str(weights_dir))
    theirs = detector(IMAGE, detect_resolution=192, image_resolution=192, output_type="np")
    # Fused attention sums in another order than controlnet-aux's: the metric depth agrees to float32 rounding,
    # which the 2nd..85th percentile stretch of a random network's nearly flat depth magnifies into grey levels.
    _same(preprocess.run("depth_zoe", IMAGE, resolution=192, use_cache=False), theirs, off_by_one=0.05)
    import torch

    ours_net = runtime.load_once("zoe", lambda: None)
    assert sum(hasattr(m, "_studio_tables") for m in ours_net.modules()) == 24  # every BEiT-L block ran fused
    x = runtime.to_batch([IMAGE], scale=1.0 / 255.0, channels_last=False)
    with torch.inference_mode():
        exact, fast = detector.model.infer(x), ours_net.infer(x)
    error = (fast - exact).abs() / (exact.max() - exact.min())
    assert error.max() < 2e-3 and error.mean() < 2e-4, (error.max(), error.mean())


def test_openpose_equals_controlnet_aux_and_gives_openpose_json(weights_dir):
    random_weights.write(weights_dir, ["body_pose_model.pth", "hand_pose_model.pth", "facenet.pth"])
    detector = aux_module("open_pose").OpenposeDetector.from_pretrained(str(weights_dir))
    theirs = detector(IMAGE, detect_resolution=192, image_resolution=192, include_hand=True, include_face=True,
                      output_type="np")
    _same(preprocess.run("openpose_full", IMAGE, resolution=192, use_cache=False), theirs)
    canvas, keypoints = preprocess.run_pose("openpose_full", IMAGE, resolution=192)
    _same(canvas, theirs)
    assert keypoints["canvas_width"] == 192 and keypoints["canvas_height"] == 192
    assert isinstance(keypoints["people"], list)
    for person in keypoints["people"]:
        assert len(person["pose_keypoints_2d"]) == 18 * 3
