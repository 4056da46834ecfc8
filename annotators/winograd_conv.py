"""Large 3x3 convolutions through NNPACK's Winograd kernels, which ship inside PyTorch's CPU build.

PyTorch sends its CPU convolutions to oneDNN, which computes them directly. NNPACK's Winograd F(6x6, 3x3)
needs about a fifth of the multiplications: a 256 -> 256 convolution over 128x192 took 100 ms against oneDNN's
235 ms on two AVX2 cores, the same result up to 2e-5 of its largest value. It loses on small maps, few
channels, 1x1 and strided convolutions, so only convolutions past `worth_it` take it. PyTorch's own dispatch
prefers oneDNN whenever it is built in; `torch._nnpack_spatial_convolution` is its entry to NNPACK's kernels.

Inference on the CPU in float32 only: training, autocast (bfloat16 on CPUs with AMX, where oneDNN is faster)
and any other case take Conv2d's own path. Same parameters and state dict.
"""
from __future__ import annotations

import functools

import torch

# measured on two AVX2 cores: 3x3 stride-1 convolutions gain from 64 -> 128 channels over 256x384 (1.7x) and
# 128 -> 128 over 64x96 (1.15x) up to 2.6x; they lost with 64 output channels or fewer, and below 64x96 pixels
MIN_PIXELS = 64 * 96
MIN_IN_CHANNELS = 64
MIN_OUT_CHANNELS = 128
# a channels-last input costs a copy to NCHW first, in proportion to its channels, while the gain grows with
# channels in times channels out: 128 -> 128 over 256x384 gained 80 ms and its copy cost as much
MIN_OUT_CHANNELS_FROM_CHANNELS_LAST = 256
# output channels x output pixels per NNPACK call, which sizes the workspace it keeps (about 15 bytes each):
# larger convolutions run in bands of rows. 2**22 kept NormalBAE's peak under controlnet-aux's at the same
# speed as one call; 2**21 cost LeReS and NormalBAE 0.5 s a map
MAX_CALL_OUTPUTS = 2**22


@functools.lru_cache(maxsize=1)
def available() -> bool:
    """NNPACK is built in and usable here (it needs AVX2 on x86). The probe also initialises NNPACK, which
    its convolution needs before its first call."""
    try:
        return bool(torch._nnpack_available())
    except (AttributeError, RuntimeError):
        return False


def worth_it(conv: torch.nn.Conv2d, input: torch.Tensor) -> bool:
    """For a convolution `install` switched (its shape and channel counts already qualify): whether this call
    takes NNPACK."""
    return (input.dim() == 4 and input.device.type == "cpu" and input.dtype == torch.float32
            and conv.weight.dtype == torch.float32 and not torch.is_grad_enabled()
            and not torch.is_autocast_enabled("cpu")
            and input.shape[-2] * input.shape[-1] >= MIN_PIXELS
            and (input.is_contiguous() or conv.out_channels >= MIN_OUT_CHANNELS_FROM_CHANNELS_LAST))


class WinogradConv2d(torch.nn.Conv2d):
    def _conv_forward(self, input, weight, bias):
        if not worth_it(self, input):
            return super()._conv_forward(input, weight, bias)
        # one image per call: for batches PyTorch's binding takes NNPACK's training-oriented path, which ran
        # 8x slower per image here
        weight = weight.contiguous()
        outs = [_banded(image[None], weight, bias, self.padding) for image in input]
        return outs[0] if len(outs) == 1 else torch.cat(outs)


def _banded(image, weight, bias, padding):
    """NNPACK's convolution of one image, in bands of rows small enough for its workspace.

    The binding keeps its largest workspace for the life of the process, and that grows with output channels
    times pixels: 190 MB for 128 channels over 256x384 in one call. Each band's input carries the rows its
    outputs need beyond it; the rows it computes from the band's own zero padding are dropped. Out: NCHW, the
    layout NNPACK computes in; turning it back to channels-last cost LeReS 0.6 s a map in copies, and the next
    layer is often another convolution that runs here.
    """
    pad_h, pad_w = padding
    height, width = image.shape[-2:]
    out_h, out_w = height + 2 * pad_h - 2, width + 2 * pad_w - 2
    bands = -(-out_h * out_w * weight.shape[0] // MAX_CALL_OUTPUTS)
    if bands <= 1:
        return torch._nnpack_spatial_convolution(image.contiguous(), weight, bias, [pad_h, pad_w], [1, 1])
    rows = -(-out_h // bands)  # bands of equal height: a last band of a row or two cost as much as a full one
    out = image.new_empty((1, weight.shape[0], out_h, out_w))
    for top in range(0, out_h, rows):
        bottom = min(top + rows, out_h)
        first, last = max(top - pad_h, 0), min(bottom - pad_h + 2, height)  # input rows of this band
        band = torch._nnpack_spatial_convolution(image[:, :, first:last].contiguous(), weight, bias,
                                                 [pad_h, pad_w], [1, 1])
        out[:, :, top:bottom] = band[:, :, top - first:bottom - first]
    return out


def install(module: torch.nn.Module) -> int:
    """Switch every plain 3x3 Conv2d (stride 1, undilated, ungrouped, zero padding of at most 1: NNPACK's
    limit) with enough channels; returns how many. A no-op where NNPACK is unavailable."""
    if not available():
        return 0
    count = 0
    for conv in module.modules():
        if type(conv) is torch.nn.Conv2d and conv.kernel_size == (3, 3) and conv.stride == (1, 1) \
                and conv.dilation == (1, 1) and conv.groups == 1 and conv.padding_mode == "zeros" \
                and not isinstance(conv.padding, str) and max(conv.padding) <= 1 \
                and conv.in_channels >= MIN_IN_CHANNELS \
                and conv.out_channels >= MIN_OUT_CHANNELS:
            conv.__class__ = WinogradConv2d
            count += 1
    return count
