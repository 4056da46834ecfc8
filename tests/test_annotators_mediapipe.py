"""mediapipe_face: MediaPipe 0.10.9's face mesh (it runs beside the WebUI's protobuf 3.20.0 and numpy < 2), its map
equal to controlnet-aux's MediapipeFaceDetector, and one sentence where mediapipe is missing."""
import sys

import numpy as np
import pytest
import skimage.data

from annotators.runtime import aux_module
from lib_controlnet import preprocess
from lib_controlnet.errors import UserError

FACE = skimage.data.astronaut()  # one face, about 100 px wide (their drawing skips faces under 64 px)


def test_registered_with_their_sliders():
    pre = preprocess.get_preprocessor("mediapipe_face")
    assert pre.api_sliders()[1:] == [
        {"name": "Max Faces", "value": 1, "min": 1, "max": 10, "step": 1},
        {"name": "Min Face Confidence", "value": 0.5, "min": 0.01, "max": 1.0, "step": 0.01}]
    assert not preprocess.module_detail(alias_names=True)["mediapipe_face"]["needs_weights"]


def test_face_mesh_drawn_as_controlnet_aux_draws_it():
    out = preprocess.run("mediapipe_face", FACE, use_cache=False)
    theirs = aux_module("mediapipe_face").MediapipeFaceDetector()(FACE, output_type="np")
    np.testing.assert_array_equal(out, theirs)
    drawn = out.any(axis=2)
    assert 0.002 < drawn.mean() < 0.1  # lines, not a filled image
    ys, xs = np.nonzero(drawn)
    assert 50 < ys.min() and ys.max() < 200 and 160 < xs.min() and xs.max() < 290  # on the astronaut's face
    assert (out[drawn][:, 1] >= 180).all()  # every one of their face colours is mostly green
    # no face: a black map; a confidence no detection reaches: a black map too
    assert not preprocess.run("mediapipe_face", np.full((128, 128, 3), 127, np.uint8), use_cache=False).any()
    # the graph kept from the first call draws the same map again
    np.testing.assert_array_equal(preprocess.run("mediapipe_face", FACE, use_cache=False), theirs)
    assert not preprocess.run("mediapipe_face", FACE, threshold_b=1.0, use_cache=False).any()


def test_without_mediapipe_one_sentence(monkeypatch):
    prefixes = ("mediapipe.", "controlnet_aux.mediapipe")
    for name in [n for n in sys.modules if n == "mediapipe" or n.startswith(prefixes)]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "mediapipe", None)  # import mediapipe -> ImportError, as where it is absent
    with pytest.raises(UserError, match=r"^mediapipe_face needs the mediapipe package, which is not installed: run "
                                        r"`pip install --no-deps mediapipe==0.10.9 absl-py` in the WebUI's"):
        preprocess.run("mediapipe_face", FACE, use_cache=False)
