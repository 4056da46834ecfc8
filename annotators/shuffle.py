"""Content shuffle: warp the image through a smooth random flow field (the shuffle ControlNet's training input)."""
from __future__ import annotations

import cv2
import numpy as np

from annotators.common import Params


def _noise_disk(h: int, w: int, scale: int, rng: np.random.Generator) -> np.ndarray:
    """Smooth noise in [0, 1]: uniform noise on a grid of `scale`-pixel cells, cubic-upsampled, min-max normalised."""
    coarse = rng.uniform(0.0, 1.0, size=(h // scale + 2, w // scale + 2))
    noise = cv2.resize(coarse, (w + 2 * scale, h + 2 * scale), interpolation=cv2.INTER_CUBIC)
    noise = noise[scale:scale + h, scale:scale + w]
    noise -= noise.min()
    top = noise.max()
    return noise / top if top > 0 else noise


def shuffle(img: np.ndarray, p: Params, cell: int = 256) -> np.ndarray:
    h, w = img.shape[:2]
    rng = np.random.default_rng(p.seed)
    map_x = (_noise_disk(h, w, cell, rng) * float(w - 1)).astype(np.float32)
    map_y = (_noise_disk(h, w, cell, rng) * float(h - 1)).astype(np.float32)
    return cv2.remap(img, map_x, map_y, cv2.INTER_LINEAR)
