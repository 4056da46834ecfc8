"""normal_dsine: the real loading code on random weights saved as dsine.pt ({"model": ...}, `module.` prefix)
in the released layout (a narrow encoder and decoder); maps equal to DSINE's own code (stored by
tests/fixtures/make_dsine_reference.py)."""
import sys
from pathlib import Path

import numpy as np
import pytest

from annotator_settings import annotator_folder
from annotators import random_weights, runtime
from annotators.weights import AnnotatorWeightsError
from lib_controlnet import preprocess
from lib_controlnet.settings import get_settings, update_settings

FIXTURES = Path(__file__).resolve().parent / "fixtures"
sys.path.insert(0, str(FIXTURES))
from make_dsine_reference import CASES, SIZE, image  # noqa: E402


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    import torch

    directory = tmp_path_factory.mktemp("dsine")
    torch.manual_seed(0)  # the weights the reference maps were made with
    state = random_weights.dsine(tiny=True)["model"]
    (directory / "normal_dsine").mkdir()
    torch.save({"model": {f"module.{k}": v for k, v in state.items()}}, directory / "normal_dsine" / "dsine.pt")
    with annotator_folder(directory):
        yield directory


@pytest.mark.parametrize("case", list(CASES))
def test_maps_equal_dsines_own_code(folder, case):
    fov, iterations = CASES[case]
    ours = preprocess.run("normal_dsine", image(), resolution=SIZE[0], threshold_a=fov, threshold_b=iterations,
                          use_cache=False)
    expected = np.load(FIXTURES / "dsine_reference.npz")[case]
    diff = np.abs(ours.astype(int) - expected)
    assert ours.shape == (*SIZE, 3) and diff.max() <= 2 and diff.mean() < 0.05, (diff.max(), diff.mean())


def test_sizes_that_are_not_multiples_of_32_are_padded_and_cropped(folder):
    out = preprocess.run("normal_dsine", image()[:64, :80], resolution=64, use_cache=False)
    assert out.shape == (64, 80, 3)


def test_a_file_of_another_network_is_one_sentence(tmp_path):
    import torch

    torch.save({"model": {"conv.weight": torch.zeros(1)}}, tmp_path / "dsine.pt")
    saved = get_settings().annotator_models_path
    update_settings(annotator_models_path=tmp_path)
    runtime.unload_all()
    try:
        with pytest.raises(AnnotatorWeightsError, match="does not hold DSINE weights"):
            preprocess.run("normal_dsine", image(), use_cache=False)
    finally:
        update_settings(annotator_models_path=saved)
        runtime.unload_all()


def test_sliders_as_the_other_extension_lists_them():
    pre = preprocess.get_preprocessor("normal_dsine")
    assert pre.control_type == "NormalMap"
    assert [s["name"] for s in pre.api_sliders()] == ["Resolution", "Fov", "Iterations"]
