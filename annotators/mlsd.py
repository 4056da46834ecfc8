"""M-LSD straight lines (mlsd_large_512_fp32.pth) drawn one pixel wide, white on black."""
from __future__ import annotations

import cv2
import numpy as np

from annotators.common import Params
from annotators.runtime import aux_module, load_once, prepare
from annotators.weights import find_weight


def _network():
    path = find_weight("mlsd_large_512_fp32.pth", "mlsd")
    detector = aux_module("mlsd").MLSDdetector.from_pretrained(str(path.parent), filename=path.name)
    return prepare(detector.model, channels_last=False)


def mlsd(img: np.ndarray, p: Params) -> np.ndarray:
    """threshold_a: minimum line score, threshold_b: minimum segment length (pixels at half resolution)."""
    import torch

    model = load_once("mlsd", _network)
    pred_lines = aux_module("mlsd.utils").pred_lines
    canvas = np.zeros(img.shape[:2], dtype=np.uint8)
    with torch.inference_mode():
        try:
            lines = pred_lines(img, model, [img.shape[0], img.shape[1]], p.threshold_a, p.threshold_b)
        except IndexError:  # controlnet-aux indexes an empty array when no line passes the thresholds
            lines = []
    for x0, y0, x1, y1 in lines:
        cv2.line(canvas, (int(x0), int(y0)), (int(x1), int(y1)), 255, 1)
    return canvas
