"""Transposed convolutions over small maps as one matrix product and a fold.

The anime line-art U-Net's innermost layers are 4x4 stride-2 transposed convolutions from 1024 channels to 512
over maps of 4x6 and 8x12 pixels. oneDNN spends most of such a call on the 33 MB weight, not on arithmetic: 33
and 39 ms on two AVX2 cores. Each input pixel's contribution to every output channel and kernel tap is one column
of (taps.out x in) @ (in x pixels), and F.fold adds the taps into place: 10 and 20 ms, the same result up to
float rounding. Past about 128 input pixels oneDNN is faster (16x24: 57 against 79 ms). Inference on the CPU
only; same parameters and state dict.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

# input pixels over which the matrix product wins (4x6: 3.2x, 8x12: 1.9x; 16x24: 0.7x; 2x3: 0.1x, where the
# product's six columns take BLAS's slow path through the transposed weight)
MIN_PIXELS = 16
MAX_PIXELS = 128


class SmallMapConvTranspose2d(torch.nn.ConvTranspose2d):
    def forward(self, input, output_size=None):
        if output_size is not None or input.dim() != 4 or input.device.type != "cpu" or torch.is_grad_enabled() \
                or not MIN_PIXELS <= input.shape[-2] * input.shape[-1] <= MAX_PIXELS \
                or not _channels_last(self.weight):  # NCHW weights (networks kept NCHW) would be copied per call
            return super().forward(input, output_size)
        n, channels, height, width = input.shape
        kh, kw = self.kernel_size
        out_h = (height - 1) * self.stride[0] - 2 * self.padding[0] + kh + self.output_padding[0]
        out_w = (width - 1) * self.stride[1] - 2 * self.padding[1] + kw + self.output_padding[1]
        pixels = input.reshape(n, channels, height * width) if input.is_contiguous() \
            else input.permute(0, 2, 3, 1).reshape(n, height * width, channels).transpose(1, 2)  # views
        # the weight (in, out, kh, kw) as (kh.kw.out, in): a view of its channels-last memory. This side of the
        # product ran 1.6x faster than (pixels x in) @ (in x taps)
        taps = torch.matmul(self.weight.permute(0, 2, 3, 1).reshape(channels, -1).t(), pixels)
        columns = taps.view(n, kh * kw, self.out_channels, height * width).transpose(1, 2)
        out = F.fold(columns.reshape(n, self.out_channels * kh * kw, height * width), (out_h, out_w),
                     self.kernel_size, padding=self.padding, stride=self.stride)
        if self.bias is not None:
            out += self.bias.view(1, -1, 1, 1)
        return out.contiguous(memory_format=torch.channels_last) if _channels_last(input) else out


def _channels_last(x) -> bool:
    return x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()


def install(module: torch.nn.Module) -> int:
    """Switch every plain ConvTranspose2d with more than one output channel (undilated, ungrouped, zero
    padding; one output channel: one_channel_conv); returns how many."""
    count = 0
    for conv in module.modules():
        if type(conv) is torch.nn.ConvTranspose2d and conv.out_channels > 1 and conv.dilation == (1, 1) \
                and conv.groups == 1 and conv.padding_mode == "zeros":
            conv.__class__ = SmallMapConvTranspose2d
            count += 1
    return count
