"""Convolutions with a single output channel (plain and transposed), computed as one matrix product and shifted
sums.

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


class OneChannelConvTranspose2d(torch.nn.ConvTranspose2d):
    """The same for a transposed convolution over a channels-last map (the anime line-art U-Net ends in a 4x4
    stride-2 one from 128 channels to 1: oneDNN took 38 ms at 768x512, 10 GFLOP/s; this 10 ms): each input
    pixel's kernel taps come from one matrix product, and each tap map is added into the output at its offset
    with the stride."""

    def forward(self, input, output_size=None):
        channels_last = input.dim() == 4 and input.is_contiguous(memory_format=torch.channels_last) \
            and not input.is_contiguous()
        # on an NCHW map oneDNN's own kernel was as fast
        if output_size is not None or not channels_last or input.device.type != "cpu" or torch.is_grad_enabled():
            return super().forward(input, output_size)
        n, channels, height, width = input.shape
        kh, kw = self.kernel_size
        sh, sw = self.stride
        pad_h, pad_w = self.padding
        extra_h, extra_w = self.output_padding
        pixels = input.permute(0, 2, 3, 1).reshape(n, height * width, channels)  # a view of channels-last memory
        taps = torch.matmul(pixels, self.weight[:, 0].reshape(channels, kh * kw))
        taps = taps.transpose(1, 2).reshape(n, kh * kw, height, width)
        full = input.new_zeros((n, (height - 1) * sh + kh + extra_h, (width - 1) * sw + kw + extra_w))
        for tap in range(kh * kw):
            i, j = divmod(tap, kw)
            full[:, i:i + (height - 1) * sh + 1:sh, j:j + (width - 1) * sw + 1:sw] += taps[:, tap]
        out = full[:, pad_h:full.shape[1] - pad_h, pad_w:full.shape[2] - pad_w]
        if self.bias is not None:
            out = out + self.bias[0]
        return out[:, None].contiguous()


def install(module: torch.nn.Module) -> int:
    """Switch every plain Conv2d with one output channel and a kernel of at least 3x3 (stride 1, undilated,
    ungrouped, zero or no padding), and every plain ConvTranspose2d with one output channel (undilated,
    ungrouped, zero padding); returns how many."""
    count = 0
    for conv in module.modules():
        if type(conv) is torch.nn.Conv2d and conv.out_channels == 1 and min(conv.kernel_size) >= 3 \
                and conv.stride == (1, 1) and conv.dilation == (1, 1) and conv.groups == 1 \
                and conv.padding_mode == "zeros" and not isinstance(conv.padding, str):
            conv.__class__ = OneChannelConv2d
            count += 1
        elif type(conv) is torch.nn.ConvTranspose2d and conv.out_channels == 1 and conv.dilation == (1, 1) \
                and conv.groups == 1 and conv.padding_mode == "zeros":
            conv.__class__ = OneChannelConvTranspose2d
            count += 1
    return count
