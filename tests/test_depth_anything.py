"""Depth Anything v1 / v2: real loading code on random weights saved under the released names and key layout,
maps equal to the authors' code (reference maps stored by tests/fixtures/make_depth_anything_reference.py)."""
import sys
from pathlib import Path

import numpy as np
import pytest

from annotator_settings import annotator_folder
from annotators import random_weights, runtime
from annotators.weights import AnnotatorWeightsError
from lib_controlnet import preprocess
from lib_controlnet.settings import update_settings

FIXTURES = Path(__file__).resolve().parent / "fixtures"
sys.path.insert(0, str(FIXTURES))
from make_depth_anything_reference import SIZES, image  # noqa: E402


@pytest.fixture(scope="module")
def tiny_state():
    return random_weights.depth_anything("tiny", seed=0)


@pytest.fixture()
def folder(tmp_path):
    with annotator_folder(tmp_path, annotator_precision="float32"):
        yield tmp_path


def test_sizes_have_the_released_parameter_counts():
    """The layout behind the released files: Depth-Anything-V2's README gives 24.8M / 97.5M / 335.3M."""
    import torch

    from annotators.depth_anything import Config, DepthAnything

    for size, millions in (("vits", 24.8), ("vitb", 97.5), ("vitl", 335.3)):
        dim, features, channels = random_weights.DEPTH_ANYTHING_SIZES[size]
        with torch.device("meta"):
            model = DepthAnything(Config(dim=dim, depth=24 if size == "vitl" else 12, heads=dim // 64,
                                         features=features, out_channels=channels), 2)
        state = model.state_dict()
        assert round(sum(v.numel() for v in state.values()) / 1e6, 1) == millions
        assert "pretrained.blocks.11.attn.qkv.weight" in state
        assert "depth_head.scratch.refinenet4.out_conv.bias" in state


@pytest.mark.parametrize("version,name,filename,hw", [
    (1, "depth_anything", "depth_anything_vits14.pth", SIZES[0]),
    (2, "depth_anything_v2", "depth_anything_v2_vits.pth", SIZES[1]),  # v2 on the wide image: below
])
def test_maps_equal_the_authors_code(folder, tiny_state, version, name, filename, hw):
    import torch

    torch.save(tiny_state, folder / filename)
    h, w = hw
    ours = preprocess.run(name, image(h, w), resolution=min(h, w), use_cache=False)
    expected = np.load(FIXTURES / "depth_anything_reference.npz")[f"v{version}_{h}x{w}"]
    assert ours.shape == (h, w, 3) and (ours[..., 0] == ours[..., 2]).all()
    diff = np.abs(ours[..., 0].astype(int) - expected)
    assert diff.max() <= 1 and diff.mean() < 0.01, (diff.max(), diff.mean())  # float rounding at a step


def test_v2_safetensors_in_the_other_extensions_folder_and_lowest_size_last(folder, tiny_state):
    """annotator/downloads/depth_anything_v2/depth_anything_v2_vitl.safetensors as that extension stores it;
    a ViT-L file wins over a ViT-S one in the same folder; the map equals the authors' code's."""
    import torch
    from safetensors.torch import save_file

    (folder / "depth_anything_v2").mkdir()
    save_file(tiny_state, folder / "depth_anything_v2" / "depth_anything_v2_vitl.safetensors")
    torch.save({k: v * 0 for k, v in tiny_state.items()}, folder / "depth_anything_v2_vits.pth")  # a flat map
    reference = np.load(FIXTURES / "depth_anything_reference.npz")["v2_128x192"]
    ours = preprocess.run("depth_anything_v2", image(128, 192), resolution=128, use_cache=False)
    diff = np.abs(ours[..., 0].astype(int) - reference)
    assert diff.max() <= 1 and diff.mean() < 0.01


def test_missing_weights_name_the_file_the_folder_and_the_alternatives(folder):
    with pytest.raises(AnnotatorWeightsError) as info:
        preprocess.run("depth_anything_v2", image(64, 64), use_cache=False)
    message = str(info.value)
    assert f"depth_anything_v2_vitl.pth: put it in {folder}" in message
    assert "depth-anything/Depth-Anything-V2-Large" in message and "depth_anything_v2_vits.pth" in message


def test_a_file_of_another_network_is_one_sentence(folder, tiny_state):
    import torch

    torch.save({"model": {"conv.weight": torch.zeros(1)}}, folder / "depth_anything_vitl14.pth")
    with pytest.raises(AnnotatorWeightsError, match="does not hold Depth Anything weights"):
        preprocess.run("depth_anything", image(64, 64), use_cache=False)


def test_bfloat16_keeps_the_map_close(tiny_state):
    """The network under the annotators' bfloat16 autocast (runtime.inference), at a small input (16 x 16 patches)
    to keep the test short: the map moves by a few grey levels, no more."""
    import torch

    from annotators import depth_anything as da

    net = da.build(dict(tiny_state), 2).eval()
    da.fold_layer_scales(net)
    x = da.to_net_input(image(128, 192))[..., :224, :224]
    maps = {}
    for precision in ("float32", "bfloat16"):
        update_settings(annotator_precision=precision)
        with runtime.inference(low_precision=True):
            maps[precision] = da.depth_map(net(x)[0].float(), 112, 112)
    update_settings(annotator_precision="float32")
    assert net.pretrained.blocks[0].attn.qkv.weight.dtype == torch.float32
    diff = np.abs(maps["bfloat16"].astype(int) - maps["float32"])
    assert 0 < diff.mean() < 2.0 and np.corrcoef(maps["bfloat16"].ravel(), maps["float32"].ravel())[0, 1] > 0.99


def test_listed_under_depth():
    listed = preprocess.control_types()["Depth"]["module_list"]
    assert {"depth_anything", "depth_anything_v2"} <= set(listed)
    assert preprocess.get_preprocessor("Depth_Anything_V2").control_type == "Depth"
