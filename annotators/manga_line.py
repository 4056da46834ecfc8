"""lineart_anime_denoise: the manga line extraction network (erika.pth, lllyasviel/Annotators).

Written here because controlnet-aux 0.0.10 does not have it. The network is a residual U-Net on the grey image
(0..255, unnormalised): five pre-activation residual stages going down (24, 48, 96, 192, 384 channels; each
stage after the first halves the size in its last block), four going up (nearest-neighbour upsampling in each
stage's first block) with the matching encoder stage added back, and a 1x1 convolution to one channel: black
lines on white, inverted here to the white-on-black map ControlNet wants. The module names below are the ones
the released state dict uses, so the real file loads as it is.
"""
from __future__ import annotations

import cv2
import numpy as np

from annotators.common import Params
from annotators.runtime import batchable, inference, load_once, prepare, to_uint8
from annotators.weights import find_weight

_DOWN = ((1, 24, 2), (24, 48, 3), (48, 96, 5), (96, 192, 7), (192, 384, 12))  # in, out, blocks
_UP = ((384, 192, 7), (192, 96, 5), (96, 48, 3), (48, 24, 2))


def _classes():
    from torch import nn

    class PreActConv(nn.Module):
        """batch norm (eps 1e-3), leaky ReLU 0.2, convolution (`model` holds them, as in the release)."""

        def __init__(self, cin, cout, size=3, stride=1, upsample=False):
            super().__init__()
            layers = [nn.BatchNorm2d(cin, eps=1e-3), nn.LeakyReLU(0.2),
                      nn.Conv2d(cin, cout, size, stride=stride, padding=size // 2)]
            if upsample:
                layers.append(nn.Upsample(scale_factor=2, mode="nearest"))
            self.model = nn.Sequential(*layers)

        def forward(self, x):
            return self.model(x)

    class Shortcut(nn.Module):
        """x + y, with x projected by a 1x1 convolution (then upsampled, going up) where the shapes differ."""

        def __init__(self, cin, cout, stride=1, upsample=False):
            super().__init__()
            self.model = None
            if upsample and cin != cout:
                self.model = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride), nn.Upsample(scale_factor=2))
            elif not upsample and (cin != cout or stride != 1):
                self.model = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride))

        def forward(self, x, y):
            return (x if self.model is None else self.model(x)) + y

    class Block(nn.Module):
        def __init__(self, cin, cout, stride=1, upsample=False):
            super().__init__()
            self.conv1 = PreActConv(cin, cout, stride=stride, upsample=upsample)
            self.residual = PreActConv(cout, cout)
            self.shortcut = Shortcut(cin, cout, stride, upsample)

        def forward(self, x):
            return self.shortcut(x, self.residual(self.conv1(x)))

    class Stage(nn.Module):
        def __init__(self, cin, cout, blocks, down=False, up=False):
            super().__init__()
            self.model = nn.Sequential(*[
                Block(cin if i == 0 else cout, cout, stride=2 if down and i == blocks - 1 else 1,
                      upsample=up and i == 0) for i in range(blocks)])

        def forward(self, x):
            return self.model(x)

    class MangaLineNet(nn.Module):
        def __init__(self):
            super().__init__()
            for i, (cin, cout, blocks) in enumerate(_DOWN):
                setattr(self, f"block{i}", Stage(cin, cout, blocks, down=i > 0))
            for i, (cin, cout, blocks) in enumerate(_UP):
                setattr(self, f"block{5 + i}", Stage(cin, cout, blocks, up=True))
                setattr(self, f"res{1 + i}", Shortcut(cout, cout))
            self.block9 = Stage(24, 16, 2)
            self.conv15 = PreActConv(16, 1, size=1)

        def forward(self, x):
            skips = []
            for i in range(5):
                x = getattr(self, f"block{i}")(x)
                skips.append(x)
            for i in range(4):
                x = getattr(self, f"res{1 + i}")(skips[3 - i], getattr(self, f"block{5 + i}")(x))
            return self.conv15(self.block9(x))

    return MangaLineNet


def network():
    """The network class (torch is imported only when a network is built)."""
    return _classes()()


def _load():
    import torch

    path = find_weight("erika.pth", "lineart_anime_denoise")
    state = torch.load(path, map_location="cpu", weights_only=True)
    # saved from nn.DataParallel in some copies: `module.` before every key
    state = {k[len("module."):] if k.startswith("module.") else k: v for k, v in state.items()}
    net = network()
    net.load_state_dict(state)
    return prepare(net)


def _denoise(images, p: Params):
    """Grey image -> lines; the four halvings need sides divisible by 16 (the registry pads to 64, as the other
    WebUI ControlNet extension does)."""
    import torch

    from annotators.runtime import device

    net = load_once("manga_line", _load)
    grey = np.stack([cv2.cvtColor(img, cv2.COLOR_RGB2GRAY) for img in images])
    with inference():
        feed = torch.from_numpy(grey).to(device())[:, None].float()
        lines = net(feed)[:, 0].float()
        return to_uint8(lines.neg_().add_(255.0))


lineart_anime_denoise = batchable(_denoise)
