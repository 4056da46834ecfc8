"""Colour maps: the T2I-Adapter colour grid and the recolor models' luminance/intensity inputs."""
from __future__ import annotations

import cv2
import numpy as np

from annotators.common import Params, channel_max


def color_grid(img: np.ndarray, p: Params, cell: int = 64) -> np.ndarray:
    """One colour per 64x64 cell (cubic down-sampling: the colour near the cell centre, as the T2I colour
    adapter was trained), shown as flat blocks (nearest up-sampling)."""
    h, w = img.shape[:2]
    small = cv2.resize(img, (max(1, w // cell), max(1, h // cell)), interpolation=cv2.INTER_CUBIC)
    return cv2.resize(small, (w, h), interpolation=cv2.INTER_NEAREST)


def _gamma(channel: np.ndarray, gamma: float) -> np.ndarray:
    if abs(gamma - 1.0) < 1e-6:
        return channel
    lut = ((np.arange(256, dtype=np.float64) / 255.0) ** gamma * 255.0).clip(0, 255).astype(np.uint8)
    return cv2.LUT(channel, lut)


def recolor_luminance(img: np.ndarray, p: Params) -> np.ndarray:
    """CIELAB lightness L* (as 8-bit 0..255), gamma-corrected by the slider."""
    lightness = cv2.cvtColor(img, cv2.COLOR_RGB2LAB)[:, :, 0]
    return _gamma(lightness, float(p.threshold_a))


def recolor_intensity(img: np.ndarray, p: Params) -> np.ndarray:
    """HSV value (the brightest channel), gamma-corrected by the slider."""
    return _gamma(channel_max(img), float(p.threshold_a))
