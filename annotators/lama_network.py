"""LaMa's generator (big-lama: a ResNet of fast Fourier convolutions), laid out as its released weights store it.

Written here from the paper and the released configuration because no package installable beside the WebUI's
pins has it (controlnet-aux 0.0.10 does not; the inpainting tools that do ship TorchScript files, not
lllyasviel's `ControlNetLama.pth`). The state dict keys are those of the original `FFCResNetGenerator`:
`model.<i>.<...>` in one Sequential — 0 reflection pad, 1 the 7x7 input convolution, 2..4 the stride-2
downsamplings (the last one splits its output into 1/4 local and 3/4 global channels), then the residual blocks of
fast Fourier convolutions, one layer joining local and global channels, three (transposed convolution, batch
norm, ReLU) upsamplings, a reflection pad, the 7x7 output convolution and a sigmoid.

Big-lama: 4 input channels (RGB with the hole zeroed, then the mask), 64 base channels, 18 residual blocks, 3/4 of
the channels global, no local Fourier unit. `from_state_dict` reads the width and the number of blocks from the
file's shapes, so a reduced-width file of the same layout (the tests') loads through the same code.
"""
from __future__ import annotations

import re

import torch
import torch.nn.functional as F
from torch import nn

GLOBAL_RATIO = 0.75
DOWNSAMPLINGS = 3


class FourierUnit(nn.Module):
    """A 1x1 convolution (+ norm, ReLU) over the real and imaginary parts of the feature map's 2-D spectrum: every
    output pixel sees the whole image, which is what fills large holes with coherent structure."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv_layer = nn.Conv2d(channels * 2, channels * 2, 1, bias=False)
        self.bn = nn.BatchNorm2d(channels * 2)

    def forward(self, x):
        n, c, h, w = x.shape
        spectrum = torch.fft.rfftn(x.float(), dim=(-2, -1), norm="ortho")
        # channel layout the weights were trained on: (c0 real, c0 imaginary, c1 real, ...)
        parts = torch.stack((spectrum.real, spectrum.imag), dim=2).reshape(n, c * 2, h, spectrum.shape[-1])
        parts = F.relu(self.bn(self.conv_layer(parts)), inplace=True)
        parts = parts.reshape(n, c, 2, h, spectrum.shape[-1])
        return torch.fft.irfftn(torch.complex(parts[:, :, 0], parts[:, :, 1]), s=(h, w), dim=(-2, -1), norm="ortho")


class SpectralTransform(nn.Module):
    """Global branch: halve the channels, add the Fourier unit's output, project back up."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        half = out_channels // 2
        self.conv1 = nn.Sequential(nn.Conv2d(in_channels, half, 1, bias=False), nn.BatchNorm2d(half), nn.ReLU(True))
        self.fu = FourierUnit(half)
        self.conv2 = nn.Conv2d(half, out_channels, 1, bias=False)

    def forward(self, x):
        x = self.conv1(x)
        return self.conv2(x + self.fu(x))


class FFC(nn.Module):
    """A convolution over a (local, global) channel split: local<->local/global by ordinary convolutions,
    global->global by the spectral transform. Paths with no channels on either side do not exist (None)."""

    def __init__(self, in_channels, out_channels, kernel_size, ratio_in, ratio_out, stride=1, padding=0):
        super().__init__()
        in_g = int(in_channels * ratio_in)
        out_g = int(out_channels * ratio_out)
        in_l, out_l = in_channels - in_g, out_channels - out_g

        def conv(cin, cout):
            if not cin or not cout:
                return None
            return nn.Conv2d(cin, cout, kernel_size, stride, padding, bias=False, padding_mode="reflect")

        self.convl2l, self.convl2g, self.convg2l = conv(in_l, out_l), conv(in_l, out_g), conv(in_g, out_l)
        self.convg2g = SpectralTransform(in_g, out_g) if in_g and out_g else None
        self.out_channels = (out_l, out_g)

    def forward(self, x_l, x_g):
        y_l = y_g = None
        if self.out_channels[0]:
            y_l = _add(_apply(self.convl2l, x_l), _apply(self.convg2l, x_g))
        if self.out_channels[1]:
            y_g = _add(_apply(self.convl2g, x_l), _apply(self.convg2g, x_g))
        return y_l, y_g


def _apply(layer, x):
    return None if layer is None or x is None else layer(x)


def _add(a, b):
    return b if a is None else a if b is None else a + b


class FFCNormAct(nn.Module):
    """FFC, then batch norm and ReLU on each side that has channels (`bn_l`, `bn_g`)."""

    def __init__(self, in_channels, out_channels, kernel_size, ratio_in, ratio_out, stride=1, padding=0):
        super().__init__()
        self.ffc = FFC(in_channels, out_channels, kernel_size, ratio_in, ratio_out, stride, padding)
        out_l, out_g = self.ffc.out_channels
        self.bn_l = nn.BatchNorm2d(out_l) if out_l else None
        self.bn_g = nn.BatchNorm2d(out_g) if out_g else None

    def forward(self, x):
        x_l, x_g = x if isinstance(x, tuple) else (x, None)
        y_l, y_g = self.ffc(x_l, x_g)
        if y_l is not None:
            y_l = F.relu(self.bn_l(y_l), inplace=True)
        if y_g is not None:
            y_g = F.relu(self.bn_g(y_g), inplace=True)
        return y_l, y_g


class FFCResBlock(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv1 = FFCNormAct(channels, channels, 3, GLOBAL_RATIO, GLOBAL_RATIO, padding=1)
        self.conv2 = FFCNormAct(channels, channels, 3, GLOBAL_RATIO, GLOBAL_RATIO, padding=1)

    def forward(self, x):
        x_l, x_g = x
        y_l, y_g = self.conv2(self.conv1((x_l, x_g)))
        return x_l + y_l, x_g + y_g


class JoinLocalGlobal(nn.Module):
    def forward(self, x):
        return torch.cat(x, dim=1)


class LamaGenerator(nn.Module):
    """(N, 4, H, W) in [0, 1] (RGB with the hole zeroed, mask) -> (N, 3, H, W) in [0, 1]; H, W divisible by 8."""

    def __init__(self, ngf: int = 64, n_blocks: int = 18, in_channels: int = 4, max_features: int = 1024):
        super().__init__()
        layers: list[nn.Module] = [nn.ReflectionPad2d(3), FFCNormAct(in_channels, ngf, 7, 0, 0)]
        for i in range(DOWNSAMPLINGS):
            ratio_out = GLOBAL_RATIO if i == DOWNSAMPLINGS - 1 else 0
            layers.append(FFCNormAct(min(max_features, ngf * 2 ** i), min(max_features, ngf * 2 ** (i + 1)), 3,
                                     0, ratio_out, stride=2, padding=1))
        width = min(max_features, ngf * 2 ** DOWNSAMPLINGS)
        layers += [FFCResBlock(width) for _ in range(n_blocks)]
        layers.append(JoinLocalGlobal())
        for i in range(DOWNSAMPLINGS):
            cin = min(max_features, ngf * 2 ** (DOWNSAMPLINGS - i))
            cout = min(max_features, ngf * 2 ** (DOWNSAMPLINGS - i - 1))
            layers += [nn.ConvTranspose2d(cin, cout, 3, stride=2, padding=1, output_padding=1),
                       nn.BatchNorm2d(cout), nn.ReLU(True)]
        layers += [nn.ReflectionPad2d(3), nn.Conv2d(ngf, 3, 7), nn.Sigmoid()]
        self.model = nn.Sequential(*layers)

    def forward(self, x):
        return self.model(x)


def strip_wrappers(state: dict) -> dict:
    """The generator's own keys from ControlNetLama.pth (already bare) or a training checkpoint's state dict
    (`state_dict` holding `generator.model.*`)."""
    if isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if any(k.startswith("generator.") for k in state):
        state = {k[len("generator."):]: v for k, v in state.items() if k.startswith("generator.")}
    return state


def from_state_dict(state: dict) -> LamaGenerator:
    """A generator shaped as the state dict says (width from the input convolution, blocks counted), loaded
    strictly: ValueError (one sentence) when the keys are not a LaMa generator's."""
    first = state.get("model.1.ffc.convl2l.weight")
    if first is None or first.ndim != 4:
        raise ValueError("it has no model.1.ffc.convl2l.weight, so it is not a LaMa generator")
    blocks = {int(m.group(1)) for k in state for m in [re.match(r"model\.(\d+)\.conv1\.ffc\.", k)] if m}
    net = LamaGenerator(ngf=int(first.shape[0]), n_blocks=len(blocks), in_channels=int(first.shape[1]))
    try:
        net.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()})
    except RuntimeError as error:
        problem = str(error).split("\n\t")[1] if "\n\t" in str(error) else str(error)
        raise ValueError(f"its tensors do not fit a LaMa generator ({problem.strip()[:200]})") from None
    return net
