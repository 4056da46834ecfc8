"""Inpaint hints: the image with its mask, as the inpaint ControlNet (control_v11p_sd15_inpaint) expects.

`run` returns RGBA (alpha 255 = repaint here); `to_control_hint` turns that into the float hint the model was
trained on: RGB in [0, 1] with every masked pixel set to -1.
"""
from __future__ import annotations

import numpy as np

from annotators.common import Params


def inpaint(img: np.ndarray, p: Params) -> np.ndarray:
    if p.mask is None:
        return img
    return np.concatenate([img, p.mask[..., None]], axis=2)


def to_control_hint(rgba: np.ndarray) -> np.ndarray:
    """HxWx4 uint8 (alpha = mask) -> HxWx3 float32 hint; HxWx3 input gives the plain [0, 1] image."""
    hint = rgba[..., :3].astype(np.float32) / 255.0
    if rgba.ndim == 3 and rgba.shape[2] == 4:
        hint[rgba[..., 3] > 127] = -1.0
    return hint
