"""Large-kernel convolutions with a single output channel, computed as one matrix product and shifted sums.

The line-art generators end in a 7x7 convolution from 64 channels to 1 over the full-size image. Neither of
PyTorch's CPU convolution kernels handles one output channel well: oneDNN took 370 ms for it at 512x768 on two
cores, about 4 GFLOP/s. Here the 49 kernel taps of every pixel come from one (taps x channels) @ (channels x
pixels) matrix product, and the output is the sum of the 49 tap maps, each shifted by its tap's offset: 140 ms,
the same convolution up to float rounding. Inference on the CPU only; same parameters and state dict.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


class OneChannelConv2d(torch.nn.Conv2d):
    def _conv_forward(self, input, weight, bias):
        if input.dim() != 4 or input.device.type != "cpu" or torch.is_grad_enabled():
            return super()._conv_forward(input, weight, bias)
        pad_h, pad_w = self.padding
        x = F.pad(input, (pad_w, pad_w, pad_h, pad_h)) if pad_h or pad_w else input
        n, channels, height, width = x.shape
        kh, kw = self.kernel_size
        out_h, out_w = height - kh + 1, width - kw + 1
        taps = torch.matmul(weight[0].reshape(channels, kh * kw).t(), x.reshape(n, channels, height * width))
        taps = taps.view(n, kh * kw, height, width)
        out = taps[:, 0, :out_h, :out_w].clone()
        for tap in range(1, kh * kw):
            i, j = divmod(tap, kw)
            out += taps[:, tap, i:i + out_h, j:j + out_w]
        if bias is not None:
            out += bias[0]
        return out[:, None]


def install(module: torch.nn.Module) -> int:
    """Switch every plain Conv2d with one output channel and a kernel of at least 3x3 (stride 1, undilated,
    ungrouped, zero or no padding); returns how many."""
    count = 0
    for conv in module.modules():
        if type(conv) is torch.nn.Conv2d and conv.out_channels == 1 and min(conv.kernel_size) >= 3 \
                and conv.stride == (1, 1) and conv.dilation == (1, 1) and conv.groups == 1 \
                and conv.padding_mode == "zeros" and not isinstance(conv.padding, str):
            conv.__class__ = OneChannelConv2d
            count += 1
    return count
