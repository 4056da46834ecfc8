"""Sentences users read when something is wrong: each says what happened and what they can do, on their surface,
with no traceback and no library warning before it."""
from __future__ import annotations

import warnings

import pytest
import torch

from lib_controlnet.cli import build_parser, main


@pytest.fixture
def surface():
    from annotators import weights

    saved = weights._surface
    yield weights
    weights.use_surface(saved)


@pytest.mark.parametrize("name, ending", [
    ("cli", "or run the command again with --allow-annotator-downloads."),
    ("serve", "or restart `python -m lib_controlnet serve` with --allow-annotator-downloads."),
    ("webui", 'or turn on "Allow preprocessors to download missing weights" in Settings > ControlNet.'),
])
def test_missing_weights_sentence_names_what_each_surface_offers(surface, tmp_path, name, ending):
    from lib_controlnet.settings import get_settings, update_settings

    saved = get_settings().annotator_models_path, get_settings().allow_annotator_downloads
    update_settings(annotator_models_path=tmp_path, allow_annotator_downloads=False)
    try:
        surface.use_surface(name)
        with pytest.raises(surface.AnnotatorWeightsError) as info:
            surface.find_weight("ControlNetHED.pth", "softedge_hed")
    finally:
        update_settings(annotator_models_path=saved[0], allow_annotator_downloads=saved[1])
    assert str(info.value).endswith(ending)
    assert "in the settings" not in str(info.value) or name == "webui"


@pytest.mark.parametrize("command", [["serve"], ["detect", "--list"], ["dataset", "build"],
                                     ["generate", "--base", "b", "--prompt", "p", "--out", "o"]])
def test_the_flag_the_sentence_names_exists(command):
    assert build_parser().parse_args(command + ["--allow-annotator-downloads"]).allow_annotator_downloads


def test_generate_refuses_a_seed_torch_cannot_take(tmp_path, capsys):
    code = main(["generate", "--base", str(tmp_path / "base"), "--prompt", "x", "--seed", str(2 ** 64),
                 "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1, err
    assert err == ("error: --seed must be -1 (random) or a whole number from -9223372036854775808 to "
                   "18446744073709551615, got 18446744073709551616.\n")


def test_a_torchscript_pth_is_refused_without_a_torch_warning(tmp_path, capsys):
    path = tmp_path / "control_v11p_sd15_canny.pth"
    torch.jit.save(torch.jit.script(torch.nn.Conv2d(3, 3, 1)), str(path))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        code = main(["models", "info", str(path)])
    assert code == 2
    assert [str(w.message) for w in caught] == []
    assert capsys.readouterr().err == (
        "error: control_v11p_sd15_canny.pth is a TorchScript program, not a weights file, so it was not loaded "
        "(loading it could run code); use a .safetensors version of this model.\n")


class _OpensAFile:
    """Unpickling this calls open(path, "w"): a pickle that runs code, harmlessly visible."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return open, (self.path, "w")


def test_an_annotator_pickle_that_runs_code_is_refused_before_it_is_loaded(tmp_path, capsys):
    """controlnet-aux unpickles annotator files itself (unrestricted on the WebUI's torch 2.1): ours looks first."""
    marker = tmp_path / "code-ran"
    weights_dir = tmp_path / "annotators"
    weights_dir.mkdir()
    torch.save({"weight": torch.zeros(2), "payload": _OpensAFile(marker)}, weights_dir / "ControlNetHED.pth")
    photo = tmp_path / "in.png"
    from PIL import Image

    Image.new("RGB", (32, 32), "white").save(photo)
    from lib_controlnet.settings import get_settings, update_settings

    saved = get_settings().annotator_models_path
    try:
        code = main(["detect", "--module", "softedge_hed", "--annotator-dir", str(weights_dir), str(photo),
                     str(tmp_path / "out.png")])
    finally:
        update_settings(annotator_models_path=saved)
    assert code == 2 and not marker.exists()
    assert capsys.readouterr().err == (
        "error: ControlNetHED.pth contains Python objects other than weights, so it was not loaded (loading it "
        f"could run code); replace {weights_dir / 'ControlNetHED.pth'} with the ControlNetHED.pth published in "
        "lllyasviel/Annotators on Hugging Face.\n")
