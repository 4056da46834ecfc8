"""The smaller modules users of the other WebUI ControlNet extension know: lineart_anime_denoise (the manga line
network, erika.pth) and t2ia_sketch_pidi (PiDiNet edges above one half), each through preprocess.run on random
weights saved under the real file names, against a reference."""
import cv2
import numpy as np
import pytest
import skimage.data
import torch

from annotator_settings import annotator_folder
from annotators import manga_line, random_weights
from annotators.runtime import aux_module
from lib_controlnet import preprocess

IMAGE = cv2.resize(skimage.data.astronaut(), (64, 64), interpolation=cv2.INTER_AREA)


@pytest.fixture(scope="module")
def weights_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("small")
    random_weights.write(directory, ["table5_pidinet.pth"])
    torch.manual_seed(0)
    state = manga_line.network().state_dict()
    # as copies saved from nn.DataParallel hold it: `module.` before every key
    torch.save({f"module.{k}": v for k, v in state.items()}, directory / "erika.pth")
    with annotator_folder(directory, annotator_precision="float32"):
        yield directory


def test_manga_line_network_has_the_released_key_layout():
    keys = manga_line.network().state_dict()
    # names the released erika.pth uses (the published network's module tree): stages of blocks, pre-activation
    # convolutions (norm 0, conv 2), 1x1 projections where a block changes shape
    for key in ("block0.model.0.conv1.model.0.running_var", "block0.model.0.shortcut.model.0.weight",
                "block1.model.2.conv1.model.2.weight", "block4.model.11.residual.model.2.bias",
                "block5.model.0.shortcut.model.0.weight", "block8.model.1.residual.model.0.weight",
                "block9.model.1.conv1.model.2.weight", "conv15.model.2.weight"):
        assert key in keys, key
    assert not any(k.startswith("res") for k in keys)  # the skip additions hold no weights
    assert keys["block4.model.11.residual.model.2.weight"].shape == (384, 384, 3, 3)
    assert keys["block5.model.0.conv1.model.2.weight"].shape == (192, 384, 3, 3)


def test_lineart_anime_denoise_equals_the_plain_network(weights_dir):
    ours = preprocess.run("lineart_anime_denoise", IMAGE, resolution=64, use_cache=False)
    # reference: grey (OpenCV's weights), the network as published, 255 - lines; 64 px, a multiple of 64, so no
    # padding: two passes of its 43 M weights are what this test costs
    state = torch.load(weights_dir / "erika.pth", weights_only=True)
    net = manga_line.network()
    net.load_state_dict({k[len("module."):]: v for k, v in state.items()})
    grey = cv2.cvtColor(IMAGE, cv2.COLOR_RGB2GRAY)
    with torch.no_grad():
        lines = net.eval()(torch.from_numpy(grey).float()[None, None])[0, 0].numpy()
    expected = (255 - lines).clip(0, 255).astype(np.uint8)
    assert ours.shape == (64, 64, 3)
    diff = np.abs(ours[..., 0].astype(int) - expected)
    assert diff.max() <= 1 and (diff > 0).mean() < 1e-2, (diff.max(), (diff > 0).mean())
    assert len(np.unique(ours)) > 2  # the map is not one flat value


def test_t2ia_sketch_pidi_equals_controlnet_aux(weights_dir):
    detector = aux_module("pidi").PidiNetDetector.from_pretrained(str(weights_dir))
    square = IMAGE
    theirs = detector(square, detect_resolution=64, image_resolution=64, output_type="np", apply_filter=True)
    ours = preprocess.run("t2ia_sketch_pidi", square, resolution=64, use_cache=False)
    assert set(np.unique(ours)) <= {0, 255}
    diff = ours != theirs
    assert diff.mean() < 2e-3, diff.mean()  # a value right at one half may land either side in another sum order


def test_registry_lists_them_with_their_sliders_and_types():
    detail = preprocess.module_detail(alias_names=True)
    assert detail["lineart_anime_denoise"]["needs_weights"]
    assert "lineart_anime_denoise" in preprocess.control_types()["Lineart"]["module_list"]
    assert "t2ia_sketch_pidi" in preprocess.control_types()["T2I-Adapter"]["module_list"]
    assert preprocess.get_preprocessor("pidinet_sketch").label == "t2ia_sketch_pidi"
