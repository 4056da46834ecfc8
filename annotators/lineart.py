"""Line art from controlnet-aux's generators: realistic / coarse (sk_model.pth, sk_model2.pth) and anime (netG.pth).

Output convention as users know it: black lines on white is what the networks draw; the map ControlNet wants is
white lines on black, so the result is inverted (255 - x), exactly as controlnet-aux does.
"""
from __future__ import annotations

import cv2
import numpy as np

from annotators.common import Params
from annotators.runtime import aux_module, batchable, inference, load_once, prepare, to_batch, to_uint8
from annotators.weights import find_weight


def _lineart_networks():
    fine = find_weight("sk_model.pth", "lineart_realistic")
    coarse = find_weight("sk_model2.pth", "lineart_coarse")
    detector = aux_module("lineart").LineartDetector.from_pretrained(
        str(fine.parent), filename=fine.name, coarse_filename=str(coarse))  # os.path.join keeps an absolute path
    return _channels_last(detector.model), _channels_last(detector.model_coarse)


def _channels_last(network):
    """Channels-last, with an instance norm that keeps it so (annotators/instance_norm.py): the generators' 3x3
    and transposed convolutions run faster that way on the CPU (line art 4.0 -> 2.7 s at 768 x 512)."""
    from annotators import instance_norm

    instance_norm.install(network)
    return prepare(network)


def _run_generator(images, coarse: bool):
    fine_net, coarse_net = load_once("lineart", _lineart_networks)
    net = coarse_net if coarse else fine_net
    with inference(low_precision=True):
        line = net(to_batch(images, scale=1.0 / 255.0))[:, 0].float()
        return [255 - m for m in to_uint8(line.mul_(255.0))]


def _realistic(images, p: Params):
    return _run_generator(images, coarse=False)


def _coarse(images, p: Params):
    return _run_generator(images, coarse=True)


realistic = batchable(_realistic)
coarse = batchable(_coarse)


def _anime_network():
    path = find_weight("netG.pth", "lineart_anime")
    detector = aux_module("lineart_anime").LineartAnimeDetector.from_pretrained(str(path.parent), filename=path.name)
    return _channels_last(detector.model)


def _anime(images, p: Params):
    """The anime U-Net needs sides divisible by 256: the image is cubic-resized up to that and the lines back."""
    net = load_once("lineart_anime", _anime_network)
    h, w = images[0].shape[:2]
    hn, wn = 256 * int(np.ceil(h / 256.0)), 256 * int(np.ceil(w / 256.0))
    feed = [cv2.resize(img, (wn, hn), interpolation=cv2.INTER_CUBIC) if (hn, wn) != (h, w) else img
            for img in images]
    with inference(low_precision=True):
        lines = net(to_batch(feed, scale=1.0 / 127.5, offset=-1.0))[:, 0].float()
        lines = lines.mul_(127.5).add_(127.5)
        lines = lines.cpu().numpy()
    out = []
    for line in lines:
        if (hn, wn) != (h, w):
            line = cv2.resize(line, (w, h), interpolation=cv2.INTER_CUBIC)
        out.append(255 - line.clip(0, 255).astype(np.uint8))
    return out


anime = batchable(_anime)
