"""annotators.openpose_body.FastBody against controlnet-aux's Body on the same network outputs.

The network here is a small real module that draws two people as OpenPose's heads would see them (a blob per
joint in the heatmaps, unit vectors along each limb in the part-affinity fields), so peak finding, limb scoring
and person assembly all have real work; random weights (the heavy test) find almost nobody.
"""
import numpy as np
import pytest
import torch

from annotators.openpose_body import _LIMBS, _PAF_CHANNELS, FastBody
from annotators.runtime import aux_module

# 18 joints (x, y) in 0..1, COCO order as OpenPose's body model uses it
_PERSON = [(0.50, 0.15), (0.50, 0.28), (0.40, 0.28), (0.36, 0.42), (0.34, 0.55), (0.60, 0.28), (0.64, 0.42),
           (0.66, 0.55), (0.44, 0.55), (0.43, 0.72), (0.42, 0.90), (0.56, 0.55), (0.57, 0.72), (0.58, 0.90),
           (0.48, 0.13), (0.52, 0.13), (0.46, 0.14), (0.54, 0.14)]


class DrawnPeople(torch.nn.Module):
    """(PAFs, heatmaps) at 1/8 of the input size for people at the given offsets and scales."""

    def __init__(self, people):
        super().__init__()
        self.people = people
        self.anchor = torch.nn.Parameter(torch.zeros(1))  # so that next(parameters()) finds a device

    def forward(self, x):
        h, w = x.shape[2] // 8, x.shape[3] // 8
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
        heat, paf = np.zeros((19, h, w)), np.zeros((38, h, w))
        for dx, dy, scale in self.people:
            joints = [((dx + jx * scale) * w, (dy + jy * scale) * h) for jx, jy in _PERSON]
            for part, (jx, jy) in enumerate(joints):
                heat[part] = np.maximum(heat[part], 0.9 * np.exp(-((xx - jx) ** 2 + (yy - jy) ** 2) / 2.0))
            for (a, b), (ca, cb) in zip(_LIMBS, _PAF_CHANNELS):
                (ax, ay), (bx, by) = joints[a - 1], joints[b - 1]
                length = max(np.hypot(bx - ax, by - ay), 1e-6)
                ux, uy = (bx - ax) / length, (by - ay) / length
                t = np.clip(((xx - ax) * ux + (yy - ay) * uy) / length, 0, 1)
                near = np.hypot(xx - (ax + t * (bx - ax)), yy - (ay + t * (by - ay))) <= 1.5
                paf[ca - 19][near], paf[cb - 19][near] = ux, uy
        heat[18] = 1 - heat[:18].max(0)
        return torch.from_numpy(paf[None]).float(), torch.from_numpy(heat[None]).float()


def _aux_body(model):
    body = object.__new__(aux_module("open_pose.body").Body)  # its __init__ would load a weight file
    body.model = model
    return body


@pytest.mark.parametrize("size, people", [
    ((512, 512), [(0.0, 0.0, 1.0)]),
    ((512, 768), [(-0.2, 0.0, 0.9), (0.25, 0.05, 0.8)]),
    ((384, 640), [(-0.25, 0.1, 0.7), (0.0, 0.0, 0.9), (0.3, 0.2, 0.6)]),
])
def test_fast_body_gives_controlnet_aux_candidates_and_people(size, people):
    model = DrawnPeople(people)
    image = np.random.default_rng(0).integers(0, 256, (*size, 3), dtype=np.uint8)
    theirs = _aux_body(model)(image)
    ours = FastBody(_aux_body(model))(image)
    np.testing.assert_allclose(ours[0], theirs[0], rtol=0, atol=1e-9)
    np.testing.assert_allclose(ours[1], theirs[1], rtol=0, atol=1e-9)
    assert len(ours[1]) == len(people) and (ours[1][:, :18] >= 0).all()  # everybody found, every joint


def test_fast_body_with_nobody_in_the_picture():
    model = DrawnPeople([])
    image = np.zeros((256, 256, 3), dtype=np.uint8)
    candidate, subset = FastBody(_aux_body(model))(image)
    theirs = _aux_body(model)(image)
    assert candidate.shape == theirs[0].shape and subset.shape == theirs[1].shape == (0, 20)


def test_maps_of_small_images_shrink_channel_by_channel():
    """Small photos shrink the 19/38-channel maps by a non-integer factor, where OpenCV's area resize takes at most
    4 channels: the maps come out as each channel resized alone."""
    import cv2
    import numpy as np

    from annotators.openpose_body import _resize

    maps = np.random.default_rng(0).random((40, 40, 19), dtype=np.float32)
    out = _resize(maps, 30, 23)
    alone = np.stack([cv2.resize(maps[:, :, i], (30, 23), interpolation=cv2.INTER_AREA) for i in range(19)], axis=2)
    assert out.shape == (23, 30, 19) and np.array_equal(out, alone)
