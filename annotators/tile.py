"""Tile preprocessors: the tile model sees a (possibly down-sampled) copy of the image itself."""
from __future__ import annotations

import cv2
import numpy as np

from annotators.common import Params


def tile_resample(img: np.ndarray, p: Params) -> np.ndarray:
    """Down-sample by the "Down Sampling Rate" slider (area filter); rates below 1.1 keep the image as is."""
    rate = float(p.threshold_a)
    if rate < 1.1:
        return img
    h, w = img.shape[:2]
    size = (max(1, int(w / rate)), max(1, int(h / rate)))
    return cv2.resize(img, size, interpolation=cv2.INTER_AREA)


def identity(img: np.ndarray, p: Params) -> np.ndarray:
    """tile_colorfix(+sharp), inpaint without mask, none: the hint is the image; the sliders act at sampling time."""
    return img
