"""DPT's decoder (MiDaS, Zoe) scheduled for the CPU: same weights, the same maps up to float rounding.

- Each fusion block upsamples its 256-channel map 2x and then applies a 1x1 output convolution. Bilinear
  upsampling mixes each channel's own pixels with weights that sum to one, so it commutes with a 1x1
  convolution and its bias: the convolution runs first, on a quarter of the pixels (MiDaS at 768x512: its last
  one took 110 ms after the upsampling).
- The decoder keeps NCHW, the layout its large 3x3 convolutions compute in through NNPACK
  (annotators/winograd_conv.py); channels-last there cost a copy around each of them. The head's 32-channel
  convolution over the full-size map stays channels-last, where oneDNN ran it 1.6x faster, and its input turns
  channels-last before the upsampling, at a quarter of the size.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F


def _fusion_forward(self, *xs, size=None):
    output = xs[0]
    if len(xs) == 2:
        output = self.skip_add.add(output, self.resConfUnit1(xs[1]))
    output = self.resConfUnit2(output)
    if size is None and getattr(self, "size", None) is None:
        modifier = {"scale_factor": 2}
    else:
        modifier = {"size": size if size is not None else self.size}
    output = self.out_conv(output)
    return F.interpolate(output, **modifier, mode="bilinear", align_corners=self.align_corners)


@functools.lru_cache(maxsize=None)
def _conv_first(cls):
    return type(f"ConvFirst{cls.__name__}", (cls,), {"forward": _fusion_forward})


class _ChannelsLast(torch.nn.Module):
    def forward(self, x):
        return x.contiguous(memory_format=torch.channels_last)


def _is_fusion_block(module) -> bool:
    conv = getattr(module, "out_conv", None)
    return (type(module).__name__ == "FeatureFusionBlock_custom" and hasattr(module, "resConfUnit2")
            and isinstance(conv, torch.nn.Conv2d) and conv.kernel_size == (1, 1) and conv.stride == (1, 1)
            and conv.padding == (0, 0))


def install(model, nchw: bool = True) -> int:
    """Reschedule `model.scratch` (a DPT decoder, already prepared); returns how many fusion blocks changed.
    nchw=False leaves the layout alone (bfloat16 autocast, where NNPACK does not run)."""
    scratch = model.scratch
    blocks = [m for m in scratch.modules() if _is_fusion_block(m)]
    for block in blocks:
        block.__class__ = _conv_first(type(block))
    if not nchw:
        return len(blocks)
    scratch.to(memory_format=torch.contiguous_format)
    head = getattr(scratch, "output_conv", None)
    if isinstance(head, torch.nn.Sequential) and len(head) > 2 and type(head[1]).__name__ == "Interpolate" \
            and isinstance(head[2], torch.nn.Conv2d):
        head[2].to(memory_format=torch.channels_last)
        head[1] = torch.nn.Sequential(_ChannelsLast(), head[1])
    return len(blocks)
