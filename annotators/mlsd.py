"""M-LSD straight lines (mlsd_large_512_fp32.pth) drawn one pixel wide, white on black."""
from __future__ import annotations

import cv2
import numpy as np

from annotators.common import Params
from annotators.runtime import aux_module, device, inference, load_once, prepare
from annotators.weights import find_weight

_TOP_K, _PEAK_WINDOW = 200, 3  # as controlnet-aux's pred_lines decodes the network's centre map


def _network():
    path = find_weight("mlsd_large_512_fp32.pth", "mlsd")
    detector = aux_module("mlsd").MLSDdetector.from_pretrained(str(path.parent), filename=path.name)
    # channels-last: its depthwise and dilated convolutions ran 1.5x faster than in NCHW (float32, two AVX2 cores)
    return prepare(detector.model)


def _network_input(img: np.ndarray):
    """RGB plus a constant fourth channel, scaled to [-1, 1] in float32 with the same float operations as
    controlnet-aux (which builds it in float64 first and resizes the image to its own size); channels-last."""
    import torch

    rgb = torch.from_numpy(np.ascontiguousarray(img)).to(device()).float()
    ones = torch.ones((*img.shape[:2], 1), device=rgb.device)
    return torch.cat([rgb, ones], dim=2).div_(127.5).sub_(1.0).unsqueeze(0).permute(0, 3, 1, 2)


def _segments(outputs, score_thr: float, dist_thr: float) -> np.ndarray:
    """controlnet-aux's selection of line segments from the decoded peaks, vectorised, in the same order."""
    points, scores, displacement = aux_module("mlsd.utils").deccode_output_score_and_ptss(
        outputs, _TOP_K, _PEAK_WINDOW)
    y, x = points[:, 0], points[:, 1]
    d = displacement[y, x]  # only at the peaks, not over the whole map
    length = np.sqrt(np.sum((d[:, :2] - d[:, 2:]) ** 2, axis=-1))
    keep = (scores > score_thr) & (length > dist_thr)
    y, x, d = y[keep], x[keep], d[keep]
    # the network works at half resolution: endpoints are doubled
    return 2 * np.stack([x + d[:, 0], y + d[:, 1], x + d[:, 2], y + d[:, 3]], axis=1)


def mlsd(img: np.ndarray, p: Params) -> np.ndarray:
    """threshold_a: minimum line score, threshold_b: minimum segment length (pixels at half resolution)."""
    model = load_once("mlsd", _network)
    with inference(low_precision=True):
        lines = _segments(model(_network_input(img)).float(), p.threshold_a, p.threshold_b)
    canvas = np.zeros(img.shape[:2], dtype=np.uint8)
    for x0, y0, x1, y1 in lines:
        cv2.line(canvas, (int(x0), int(y0)), (int(x1), int(y1)), 255, 1)
    return canvas
