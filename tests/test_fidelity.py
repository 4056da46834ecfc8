"""Each control-fidelity score against its definition on hand-made maps: identical maps score the maximum (1.0),
shifted, empty and inverted maps score lower as the definition says."""
import numpy as np
import pytest

from lib_controlnet import fidelity
from lib_controlnet.fidelity import Observation


def rgb(grey):
    return np.repeat(np.asarray(grey, np.uint8)[..., None], 3, axis=-1)


def outline_square(shift=0, size=64):
    grey = np.zeros((size, size), np.uint8)
    a, b = 16 + shift, 47 + shift
    grey[a, 16:48] = grey[b, 16:48] = 255
    grey[16:48, a] = grey[16:48, b] = 255
    return rgb(grey)


def score(fn, a, b, **kw):
    return fn(Observation(a), Observation(b), **kw)


def test_edge_f1():
    square = outline_square()
    assert score(fidelity.edge_f1, square, square) == 1.0
    assert score(fidelity.edge_f1, square, outline_square(shift=1)) == 1.0  # within the 2 px tolerance
    shifted = score(fidelity.edge_f1, square, outline_square(shift=6))
    assert 0.0 < shifted < 0.5  # only the crossings of the two squares still match
    assert score(fidelity.edge_f1, square, np.zeros_like(square)) == 0.0
    assert score(fidelity.edge_f1, square, 255 - square) < 0.3  # nearly every pixel an edge: precision collapses
    # precision and recall as defined: half the edges found, none spurious -> F1 = 2*1*0.5/1.5
    half = square.copy()
    half[:, 32:] = 0
    recall = (half[..., 0] > 0).sum() / (square[..., 0] > 0).sum()
    assert score(fidelity.edge_f1, square, half) == pytest.approx(2 * recall / (1 + recall), abs=0.03)


def test_segmentation_miou():
    seg = np.zeros((40, 40, 3), np.uint8)
    seg[:] = (10, 120, 200)
    seg[10:30, 10:30] = (4, 200, 3)
    assert score(fidelity.segmentation_miou, seg, seg) == 1.0
    shifted = np.roll(seg, 10, axis=1)
    # class "square": 200 / 600 overlap; background: 1000 / 1400
    assert score(fidelity.segmentation_miou, seg, shifted) == pytest.approx((200 / 600 + 1000 / 1400) / 2)
    assert score(fidelity.segmentation_miou, seg, np.zeros_like(seg)) == 0.0
    assert score(fidelity.segmentation_miou, seg, 255 - seg) == 0.0


def test_map_correlation():
    ramp = rgb(np.tile(np.linspace(0, 255, 48), (48, 1)))
    assert score(fidelity.map_correlation, ramp, ramp) == pytest.approx(1.0)
    scaled = rgb((ramp[..., 0] * 0.5 + 60).astype(np.uint8))  # same relative depth, other scale and shift
    assert score(fidelity.map_correlation, ramp, scaled) == pytest.approx(1.0, abs=1e-3)
    shifted = np.roll(ramp, 24, axis=1)
    assert score(fidelity.map_correlation, ramp, shifted) < 0.5
    assert score(fidelity.map_correlation, ramp, np.zeros_like(ramp)) == 0.0
    assert score(fidelity.map_correlation, ramp, 255 - ramp) == 0.0  # r = -1, floored


def person(offset=0.0, hidden=()):
    points = [[100 + 10 * i + offset, 50 + 20 * (i % 3), 1.0] for i in range(18)]
    for i in hidden:
        points[i] = [0, 0, 0]
    return {"pose_keypoints_2d": [v for p in points for v in p]}


def pose(*people):
    return {"people": list(people), "canvas_width": 512, "canvas_height": 512}


def test_pose_pck():
    blank = np.zeros((8, 8, 3), np.uint8)

    def pck(a, b):
        return fidelity.pose_pck(Observation(blank, a), Observation(blank, b))

    wanted = pose(person())
    assert pck(wanted, wanted) == 1.0
    # keypoint box side is 170 px, so 0.1 of it = 17 px: a 10 px shift is still correct, a 30 px one is not
    assert pck(wanted, pose(person(offset=10))) == 1.0
    assert pck(wanted, pose(person(offset=30))) == 0.0
    assert pck(wanted, pose(person(hidden=range(9)))) == pytest.approx(9 / 18)
    assert pck(wanted, pose()) == 0.0
    assert pck(pose(person(), person(offset=300)), pose(person(offset=300))) == pytest.approx(0.5)


def test_ssim():
    rng = np.random.default_rng(0)
    texture = rgb(rng.integers(0, 256, (48, 48)))
    assert score(fidelity.ssim, texture, texture) == pytest.approx(1.0)
    assert score(fidelity.ssim, texture, np.roll(texture, 3, axis=1)) < 0.2
    assert score(fidelity.ssim, texture, np.zeros_like(texture)) < 0.05
    assert score(fidelity.ssim, texture, 255 - texture) < 0


def test_registry_by_control_type():
    assert fidelity.score_for("canny") is fidelity.EDGE_F1
    assert fidelity.score_for("softedge_pidinet") is fidelity.EDGE_F1
    assert fidelity.score_for("mlsd") is fidelity.EDGE_F1
    assert fidelity.score_for("scribble_xdog") is fidelity.EDGE_F1
    assert fidelity.score_for("depth_midas") is fidelity.CORRELATION
    assert fidelity.score_for("normal_bae") is fidelity.CORRELATION
    assert fidelity.score_for("seg_ofade20k") is fidelity.SEG_MIOU
    assert fidelity.score_for("openpose_full") is fidelity.POSE_PCK
    assert fidelity.score_for("shuffle") is fidelity.SSIM
    for item in fidelity.SCORES.values():
        assert item.definition and "\n" not in item.definition


def test_canny_redetects_its_own_map():
    """The detector path end to end: canny of a drawn shape, compared with canny of the same image, is 1.0."""
    from PIL import Image

    from lib_controlnet import shapes

    image, _, _ = shapes.samples(1, 64, seed=3)[0]
    detector = fidelity.Detector("canny")
    condition = detector.observe(image)
    result = fidelity.measure(detector, [condition], [image])
    assert result.values == [1.0] and result.score == "edge_f1"
    other, _, _ = shapes.samples(2, 64, seed=4)[1]
    assert fidelity.measure(detector, [condition], [other]).values[0] < 0.5
    assert isinstance(Image.fromarray(result.detected[0]), Image.Image)
