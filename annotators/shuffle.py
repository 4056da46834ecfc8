"""Content shuffle: warp the image through a smooth random flow field (the shuffle ControlNet's training input)."""
from __future__ import annotations

import cv2
import numpy as np

from annotators.common import Params


def _noise_disk(h: int, w: int, scale: int, extent: float, rng: np.random.Generator) -> np.ndarray:
    """Smooth noise in [0, extent] as float32 (cv2.remap's map type): uniform noise on a grid of `scale`-pixel
    cells, cubic-upsampled, min-max normalised. Upsampled in float64 (OpenCV's float32 cubic resize was four
    times slower here), then normalised and converted in one pass."""
    coarse = rng.uniform(0.0, 1.0, size=(h // scale + 2, w // scale + 2))
    noise = cv2.resize(coarse, (w + 2 * scale, h + 2 * scale), interpolation=cv2.INTER_CUBIC)
    return cv2.normalize(noise[scale:scale + h, scale:scale + w], None, 0.0, extent, cv2.NORM_MINMAX,
                         dtype=cv2.CV_32F)


def shuffle(img: np.ndarray, p: Params, cell: int = 256) -> np.ndarray:
    h, w = img.shape[:2]
    rng = np.random.default_rng(p.seed)
    map_x = _noise_disk(h, w, cell, float(w - 1), rng)
    map_y = _noise_disk(h, w, cell, float(h - 1), rng)
    return cv2.remap(img, map_x, map_y, cv2.INTER_LINEAR)
