"""Neural annotators: controlnet-aux's real loading code on random weights saved under the release file names,
and our maps equal to controlnet-aux's detectors for the same input and weights.

The heavy networks (MiDaS, LeReS, Zoe, NormalBAE, OpenPose) take minutes to build on two cores; they are in
test_annotators_heavy.py (left out locally with CONTROLNET_SKIP_HEAVY=1).
"""
import os
import subprocess
import sys
import textwrap

import cv2
import numpy as np
import pytest
import skimage.data

from annotator_settings import annotator_folder
from annotators import random_weights, runtime
from annotators.runtime import aux_module
from annotators.weights import AnnotatorWeightsError
from lib_controlnet import preprocess
from lib_controlnet.errors import UserError
from lib_controlnet.settings import get_settings, update_settings

LIGHT = ["ControlNetHED.pth", "table5_pidinet.pth", "7_model.pth", "mlsd_large_512_fp32.pth", "sk_model.pth",
         "sk_model2.pth", "netG.pth"]
IMAGE = cv2.resize(skimage.data.astronaut(), (128, 128), interpolation=cv2.INTER_AREA)
WIDE = cv2.resize(skimage.data.coffee(), (144, 96), interpolation=cv2.INTER_AREA)


@pytest.fixture(scope="module")
def weights_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("annotators")
    random_weights.write(directory, LIGHT)
    random_weights.write_segmentation(directory)
    # float32: the precision whose maps equal controlnet-aux's (bfloat16 has tests of its own below)
    with annotator_folder(directory, allow_annotator_downloads=False, annotator_precision="float32"):
        yield directory


def _aux(module, cls, directory, **kw):
    return getattr(aux_module(module), cls).from_pretrained(str(directory), **kw)


def _same(ours, theirs):
    """Equal maps, up to float summation order: channels-last convolutions add in another order, so a value
    sitting on a uint8 rounding edge may land one level off on a handful of pixels."""
    assert ours.shape == theirs.shape and ours.dtype == theirs.dtype == np.uint8
    diff = np.abs(ours.astype(int) - theirs)
    assert diff.max() <= 1 and (diff > 0).mean() < 1e-3, (diff.max(), (diff > 0).mean())


@pytest.mark.parametrize("name, kwargs", [
    ("softedge_hed", {}), ("softedge_hedsafe", {"safe": True}), ("scribble_hed", {"scribble": True})])
def test_hed_family_equals_controlnet_aux(weights_dir, name, kwargs):
    detector = _aux("hed", "HEDdetector", weights_dir)
    theirs = detector(IMAGE, detect_resolution=128, image_resolution=128, output_type="np", **kwargs)
    _same(preprocess.run(name, IMAGE, resolution=128, use_cache=False), theirs)


@pytest.mark.parametrize("name, kwargs", [
    ("softedge_pidinet", {}), ("softedge_pidisafe", {"safe": True}), ("scribble_pidinet", {"scribble": True})])
def test_pidinet_family_equals_controlnet_aux(weights_dir, name, kwargs):
    """Also proves our conversion of pixel-difference convolutions to plain ones exact."""
    detector = _aux("pidi", "PidiNetDetector", weights_dir)
    theirs = detector(IMAGE, detect_resolution=128, image_resolution=128, output_type="np", **kwargs)
    _same(preprocess.run(name, IMAGE, resolution=128, use_cache=False), theirs)


def test_pidinet_conversion_matches_the_raw_network_on_side_outputs(weights_dir):
    import torch

    from annotators.softedge import _convert_pidinet

    net = _aux("pidi", "PidiNetDetector", weights_dir).netNetwork
    with torch.no_grad():
        for p in net.parameters():  # livelier weights than the default init, so every side output matters
            p.add_(torch.randn_like(p) * 0.05)
        x = torch.rand(1, 3, 40, 56)
        for a, b in zip(net(x), _convert_pidinet(net).eval()(x)):
            torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_teed_equals_controlnet_aux(weights_dir):
    detector = _aux("teed", "TEEDdetector", weights_dir, filename="7_model.pth")
    for steps in (2, 0):
        theirs = detector(IMAGE, detect_resolution=128, safe_steps=steps, output_type="np")
        _same(preprocess.run("softedge_teed", IMAGE, resolution=128, threshold_a=steps, use_cache=False), theirs)


@pytest.mark.parametrize("name, coarse", [("lineart_realistic", False), ("lineart_coarse", True)])
def test_lineart_equals_controlnet_aux(weights_dir, name, coarse):
    detector = _aux("lineart", "LineartDetector", weights_dir)
    theirs = detector(IMAGE, coarse=coarse, detect_resolution=128, image_resolution=128, output_type="np")
    ours = preprocess.run(name, IMAGE, resolution=128, use_cache=False)
    _same(ours, theirs)
    assert ours.std() > 1


def test_lineart_anime_equals_controlnet_aux(weights_dir):
    detector = _aux("lineart_anime", "LineartAnimeDetector", weights_dir)
    theirs = detector(IMAGE, detect_resolution=128, image_resolution=128, output_type="np")
    _same(preprocess.run("lineart_anime", IMAGE, resolution=128, use_cache=False), theirs)


def test_mlsd_equals_controlnet_aux(weights_dir):
    detector = _aux("mlsd", "MLSDdetector", weights_dir)
    for thr_v, thr_d in ((0.1, 0.1), (0.01, 0.01)):
        theirs = detector(IMAGE, thr_v=thr_v, thr_d=thr_d, detect_resolution=128, image_resolution=128,
                          output_type="np")
        ours = preprocess.run("mlsd", IMAGE, resolution=128, threshold_a=thr_v, threshold_b=thr_d,
                              use_cache=False)
        _same(ours, theirs)


@pytest.fixture
def bfloat16(weights_dir):
    update_settings(annotator_precision="bfloat16")
    yield
    update_settings(annotator_precision="float32")


def _conv_output_dtypes(net):
    import torch

    seen = set()
    hooks = [m.register_forward_hook(lambda m, i, o: seen.add(o.dtype)) for m in net.modules()
             if isinstance(m, torch.nn.Conv2d)]
    return seen, hooks


@pytest.mark.parametrize("name, network, max_level, mean_level", [
    ("lineart_realistic", "lineart", 8, 1.0), ("lineart_anime", "lineart_anime", 32, 2.0),
    ("softedge_hed", "hed", 4, 0.5), ("softedge_pidinet", "pidinet", 4, 0.5)])
def test_bfloat16_runs_the_network_in_bfloat16_and_keeps_the_map_close(weights_dir, bfloat16, name, network,
                                                                        max_level, mean_level):
    update_settings(annotator_precision="float32")
    exact = preprocess.run(name, IMAGE, resolution=128, use_cache=False)
    update_settings(annotator_precision="bfloat16")
    loaded = runtime.load_once(network, lambda: None)
    net = loaded[0] if isinstance(loaded, tuple) else loaded
    dtypes, hooks = _conv_output_dtypes(net)
    try:
        fast = preprocess.run(name, IMAGE, resolution=128, use_cache=False)
    finally:
        for hook in hooks:
            hook.remove()
    import torch

    assert dtypes == {torch.bfloat16}
    assert fast.shape == exact.shape and fast.dtype == np.uint8
    diff = np.abs(fast.astype(int) - exact)
    assert diff.max() <= max_level and diff.mean() <= mean_level, (diff.max(), diff.mean())


def test_bfloat16_mlsd_still_draws_lines_at_the_same_size(weights_dir, bfloat16):
    ours = preprocess.run("mlsd", WIDE, resolution=96, threshold_a=0.01, threshold_b=0.01, use_cache=False)
    assert ours.shape == (96, 144, 3) and set(np.unique(ours)) <= {0, 255}


def test_auto_precision_follows_the_cpus_choice(weights_dir, monkeypatch):
    import torch

    for choice, fast, expected in [("auto", True, torch.bfloat16), ("auto", False, None),
                                   ("float32", True, None), ("bfloat16", False, torch.bfloat16)]:
        picked = runtime.PrecisionChoice(torch.bfloat16 if fast else None, "test")
        monkeypatch.setattr(runtime, "auto_precision", lambda picked=picked: picked)
        update_settings(annotator_precision=choice)
        assert runtime.low_precision_dtype() == expected, (choice, fast)
        with runtime.inference():  # depth, normals, poses, segmentation: float32 whatever the setting
            assert not torch.is_autocast_enabled("cpu")
        with runtime.inference(low_precision=True):
            assert torch.is_autocast_enabled("cpu") == (expected is not None)
    update_settings(annotator_precision="float32")
    with pytest.raises(ValueError, match="annotator_precision must be one of auto, float32, bfloat16"):
        update_settings(annotator_precision="half")
    assert get_settings().annotator_precision == "float32"


def test_cached_maps_are_kept_apart_by_precision(weights_dir, bfloat16):
    preprocess.clear_cache()
    fast = preprocess.run("lineart_realistic", IMAGE, resolution=128)
    update_settings(annotator_precision="float32")
    exact = preprocess.run("lineart_realistic", IMAGE, resolution=128)
    assert not np.array_equal(fast, exact)
    assert np.array_equal(exact, preprocess.run("lineart_realistic", IMAGE, resolution=128, use_cache=False))


def test_non_square_images_keep_their_aspect(weights_dir):
    for name in ("softedge_pidinet", "lineart_realistic", "softedge_teed", "lineart_anime"):
        assert preprocess.run(name, WIDE, resolution=64, use_cache=False).shape == (64, 96, 3)


def test_run_batch_equals_run_and_groups_sizes(weights_dir):
    images = [IMAGE, WIDE, IMAGE[::-1].copy(), WIDE]
    maps = preprocess.run_batch("softedge_hed", images, resolution=64, batch_size=8)
    for image, result in zip(images, maps):
        _same(result, preprocess.run("softedge_hed", image, resolution=64, use_cache=False))


@pytest.mark.parametrize("name", ["seg_ufade20k", "seg_ofade20k"])
def test_segmentation_paints_ade20k_colours(weights_dir, name):
    palette = {tuple(c) for c in aux_module("util").ade_palette()}
    out = preprocess.run(name, WIDE, resolution=64, use_cache=False)
    assert out.shape == (64, 96, 3)
    assert {tuple(c) for c in np.unique(out.reshape(-1, 3), axis=0)} <= palette


def test_segmentation_equals_transformers_upernet(weights_dir):
    import torch
    from transformers import UperNetForSemanticSegmentation

    model = UperNetForSemanticSegmentation.from_pretrained(str(weights_dir / "upernet-convnext-small"))
    x = torch.from_numpy(IMAGE).permute(2, 0, 1)[None].float() / 255.0
    x = (x - torch.tensor([0.485, 0.456, 0.406])[:, None, None]) / torch.tensor([0.229, 0.224, 0.225])[:, None, None]
    with torch.no_grad():
        labels = model(pixel_values=x).logits.argmax(dim=1)[0].numpy()
    expected = np.asarray(aux_module("util").ade_palette(), np.uint8)[labels]
    _same(preprocess.run("seg_ufade20k", IMAGE, resolution=128, use_cache=False), expected)


def test_missing_weight_names_the_file_and_the_folder(tmp_path, weights_dir):
    update_settings(annotator_models_path=tmp_path)
    runtime.unload_all()
    try:
        with pytest.raises(AnnotatorWeightsError, match=f"ControlNetHED.pth: put it in {tmp_path}") as info:
            preprocess.run("softedge_hed", IMAGE, use_cache=False)
        assert isinstance(info.value, UserError)
        with pytest.raises(AnnotatorWeightsError, match="upernet-convnext-small"):
            preprocess.run("seg_ufade20k", IMAGE, use_cache=False)
        # allowed, but offline (as in every test): one clear error, no hang
        update_settings(allow_annotator_downloads=True)
        with pytest.raises(AnnotatorWeightsError, match="Could not download table5_pidinet.pth.*by hand into"):
            preprocess.run("softedge_pidinet", IMAGE, use_cache=False)
    finally:
        update_settings(annotator_models_path=weights_dir, allow_annotator_downloads=False)
        runtime.unload_all()


def test_weights_are_found_in_family_subfolders(tmp_path, weights_dir):
    (tmp_path / "hed").mkdir()
    (tmp_path / "hed" / "ControlNetHED.pth").write_bytes((weights_dir / "ControlNetHED.pth").read_bytes())
    update_settings(annotator_models_path=tmp_path)
    runtime.unload_all()
    try:
        assert preprocess.run("softedge_hed", IMAGE, resolution=64, use_cache=False).shape == (64, 64, 3)
    finally:
        update_settings(annotator_models_path=weights_dir)
        runtime.unload_all()


def test_controlnet_aux_detectors_import_alone_and_the_package_still_works():
    code = textwrap.dedent("""
        import sys, lib_controlnet
        from annotators.runtime import aux_module
        aux_module("hed")
        assert "controlnet_aux.open_pose" not in sys.modules and "controlnet_aux.zoe" not in sys.modules
        from controlnet_aux import CannyDetector  # the real __init__ runs on demand
        assert "controlnet_aux.open_pose" in sys.modules
        print("ok")
    """)
    env = dict(os.environ, PYTHONPATH=os.getcwd())
    out = subprocess.run([sys.executable, "-W", "ignore", "-c", code], capture_output=True, text=True, env=env,
                         timeout=240)
    assert out.stdout.strip() == "ok", out.stderr[-2000:]
