"""Normal maps: from MiDaS depth gradients (normal_midas) and from NormalBAE (normal_bae, scannet.pt)."""
from __future__ import annotations

import cv2
import numpy as np

from annotators.common import Params
from annotators.depth import midas_depth
from annotators.runtime import aux_module, batchable, inference, load_once, prepare, to_batch, to_uint8
from annotators.weights import find_weight


def _midas_normal(images, p: Params):
    """Sobel gradients of MiDaS depth as x/y, a constant 2*pi as z, normalised; pixels whose relative depth
    is below the background threshold face the camera (flat)."""
    depth = midas_depth(images).cpu().numpy()  # float32: Sobel gradients would turn bfloat16 steps into noise
    out = []
    for d in depth:
        relative = (d - d.min()) / (d - d.min()).max()
        x = cv2.Sobel(d, cv2.CV_32F, 1, 0, ksize=3)
        y = cv2.Sobel(d, cv2.CV_32F, 0, 1, ksize=3)
        background = relative < p.threshold_a
        x[background] = 0
        y[background] = 0
        normal = np.stack([x, y, np.full_like(x, np.pi * 2.0)], axis=2)
        normal /= np.sum(normal ** 2.0, axis=2, keepdims=True) ** 0.5
        out.append((normal * 127.5 + 127.5).clip(0, 255).astype(np.uint8)[:, :, ::-1])
    return out


midas_normal = batchable(_midas_normal)


def _bae_network():
    path = find_weight("scannet.pt", "normal_bae")
    detector = aux_module("normalbae").NormalBaeDetector.from_pretrained(str(path.parent), filename=path.name)
    from annotators import normalbae_decoder

    normalbae_decoder.install(detector.model)
    return prepare(detector.model, channels_last=False)


_MEAN = (0.485, 0.456, 0.406)
_STD = (0.229, 0.224, 0.225)


def _bae(images, p: Params):
    import torch

    net = load_once("normal_bae", _bae_network)
    with inference(low_precision=True):
        x = to_batch(images, scale=1.0 / 255.0, channels_last=False)
        mean = torch.tensor(_MEAN, device=x.device)[None, :, None, None]
        std = torch.tensor(_STD, device=x.device)[None, :, None, None]
        normal = net((x - mean) / std)[0][-1][:, :3].float()
        normal = ((normal + 1) * 0.5).clamp_(0, 1).mul_(255.0)
        return [m for m in to_uint8(normal.permute(0, 2, 3, 1))]


bae = batchable(_bae)
