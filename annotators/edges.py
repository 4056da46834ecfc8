"""Model-free edge and line maps (OpenCV/NumPy): canny, invert, threshold, blur, XDoG scribble, standard lineart."""
from __future__ import annotations

import cv2
import numpy as np

from annotators.common import Params, channel_min, intensity_lines


def canny(img: np.ndarray, p: Params) -> np.ndarray:
    """cv2.Canny on the RGB image (gradient taken over all channels) with the two slider thresholds."""
    return cv2.Canny(img, int(p.threshold_a), int(p.threshold_b))


def invert(img: np.ndarray, p: Params) -> np.ndarray:
    """A black-on-white drawing -> the white-on-black lines the line models expect."""
    return 255 - img


def threshold(img: np.ndarray, p: Params) -> np.ndarray:
    """White where every channel is above the threshold, black elsewhere."""
    return np.where(channel_min(img) > p.threshold_a, 255, 0).astype(np.uint8)


def blur_gaussian(img: np.ndarray, p: Params) -> np.ndarray:
    return cv2.GaussianBlur(img, (0, 0), float(p.threshold_a))


def scribble_xdog(img: np.ndarray, p: Params) -> np.ndarray:
    """Difference of Gaussians (sigma 0.5 and 5): a pixel is a stroke where the fine blur is darker than the
    coarse blur, in every channel, by more than half the XDoG threshold."""
    x = img.astype(np.float32)
    fine = cv2.GaussianBlur(x, (0, 0), 0.5)
    coarse = cv2.GaussianBlur(x, (0, 0), 5.0)
    darkening = channel_min(np.subtract(coarse, fine, out=coarse))
    return np.where(2.0 * darkening > p.threshold_a, 255, 0).astype(np.uint8)


def lineart_standard(img: np.ndarray, p: Params) -> np.ndarray:
    """Black-on-white line art (or a photo) -> white lines: darkness below a sigma-6 blur, median-normalised."""
    return intensity_lines(img, sigma=6.0, floor=8.0)
