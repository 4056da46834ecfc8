"""DPT's decoder (MiDaS, Zoe) scheduled for the CPU: same weights, the same maps up to float rounding.

- Each fusion block upsamples its 256-channel map 2x and then applies a 1x1 output convolution. Bilinear
  upsampling mixes each channel's own pixels with weights that sum to one, so it commutes with a 1x1
  convolution and its bias: the convolution runs first, on a quarter of the pixels (MiDaS at 768x512: its last
  one took 110 ms after the upsampling).
- The decoder keeps NCHW, the layout its large 3x3 convolutions compute in through NNPACK
  (annotators/winograd_conv.py); channels-last there cost a copy around each of them. The head's 32-channel
  convolution over the full-size map stays channels-last, where oneDNN ran it 1.6x faster.
- The head's upsampling and everything after it run in bands of output rows, so its upsampled 128-channel
  map (200 MB at 768x512, the network's peak, and 50,000 page faults a map) never exists whole. Each band turns
  the input rows it needs channels-last before upsampling them, at a quarter of the size.
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


# output rows per band of the head's upsampled half: 32 x 768 x 128 channels is 13 MB, small enough for glibc to
# reuse one band's memory for the next instead of mapping fresh pages
HEAD_BAND_ROWS = 32


class _BandedHead(torch.nn.Sequential):
    """DPT's head: a 3x3 convolution, 2x bilinear upsampling with aligned corners, a 3x3 convolution, then
    per-pixel layers (ReLU, 1x1 convolution, ReLU). Everything from the upsampling on runs per band of output
    rows; each band upsamples the rows it needs, one beyond it on each side for the 3x3 convolution."""

    def forward(self, x):
        x = self[0](x)  # NCHW from NNPACK; each band takes its rows channels-last
        conv, pointwise = self[2], list(self)[3:]
        out_h, out_w = 2 * x.shape[-2], 2 * x.shape[-1]
        out = None
        for top in range(0, out_h, HEAD_BAND_ROWS):
            bottom = min(top + HEAD_BAND_ROWS, out_h)
            first, last = max(top - 1, 0), min(bottom + 1, out_h)
            rows = _upsampled_rows(x, first, last, out_h, out_w)
            rows = F.pad(rows, (0, 0, first - (top - 1), (bottom + 1) - last))  # the image edge's zero padding
            band = F.conv2d(rows, conv.weight, conv.bias, 1, (0, conv.padding[1]))
            for layer in pointwise:
                band = layer(band)
            if out is None:
                out = torch.empty((x.shape[0], band.shape[1], out_h, out_w), dtype=band.dtype, device=band.device,
                                  memory_format=torch.channels_last)
            out[:, :, top:bottom] = band
        return out


def _upsampled_rows(x, first, last, out_h, out_w):
    """Rows first..last-1 of F.interpolate(x, size=(out_h, out_w), mode="bilinear", align_corners=True), as a
    channels-last band, with PyTorch's source coordinates and weights. Across the width: F.interpolate on the input
    rows they need, their height unchanged (weight 1 on each row). Down the height: one matrix product with the
    rows' blend weights, channels-last in and out; picking and blending the rows elementwise took 4x longer."""
    in_h = x.shape[-2]
    scale = torch.tensor((in_h - 1) / (out_h - 1) if out_h > 1 else 0.0, dtype=torch.float32)
    source = torch.arange(first, last, dtype=torch.float32) * scale
    upper = source.long().clamp_(max=in_h - 1)
    lower = (upper + 1).clamp_(max=in_h - 1)
    weight = (source - upper).clamp_(0.0, 1.0)
    base, end = int(upper[0]), int(lower[-1]) + 1
    blend = torch.zeros((last - first, end - base), dtype=torch.float32)
    picked = torch.arange(last - first)
    blend.index_put_((picked, upper - base), 1 - weight, accumulate=True)
    blend.index_put_((picked, lower - base), weight, accumulate=True)
    # a fresh channels-last copy of the rows: a slice of a channels-last map keeps the whole map's batch stride,
    # and PyTorch's interpolation then writes NCHW
    needed = x[:, :, base:end].clone(memory_format=torch.channels_last)
    wide = F.interpolate(needed, size=(end - base, out_w), mode="bilinear", align_corners=True)
    wide = wide.contiguous(memory_format=torch.channels_last).permute(0, 2, 3, 1)  # N, rows, width, channels
    rows = torch.matmul(blend.to(x.dtype), wide.reshape(wide.shape[0], end - base, -1))
    return rows.view(wide.shape[0], last - first, out_w, wide.shape[-1]).permute(0, 3, 1, 2)


def _is_upsampling_head(head) -> bool:
    """A Sequential head: a layer, DPT's Interpolate, then a convolution."""
    return (isinstance(head, torch.nn.Sequential) and len(head) > 2 and type(head[1]).__name__ == "Interpolate"
            and isinstance(head[2], torch.nn.Conv2d))


def _is_dpt_head(head) -> bool:
    """Conv 3x3, Interpolate(2x, bilinear, aligned corners), conv 3x3, then layers that work pixel by pixel,
    none of them hooked (Zoe reads the 32-channel activation through a hook: it must see the whole map)."""
    if not (_is_upsampling_head(head) and len(head) > 3):
        return False
    interp, conv = head[1], head[2]
    pointwise = all(isinstance(m, (torch.nn.ReLU, torch.nn.Identity))
                    or (isinstance(m, torch.nn.Conv2d) and m.kernel_size == (1, 1) and m.stride == (1, 1)
                        and m.padding == (0, 0)) for m in head[3:])
    hooked = any(m._forward_hooks or m._forward_pre_hooks for m in head.modules())
    return (getattr(interp, "scale_factor", None) == 2 and getattr(interp, "mode", None) == "bilinear"
            and getattr(interp, "align_corners", None) is True and isinstance(head[0], torch.nn.Conv2d)
            and conv.kernel_size == (3, 3) and conv.stride == (1, 1)
            and conv.padding == (1, 1) and conv.dilation == (1, 1) and conv.groups == 1
            and conv.padding_mode == "zeros" and pointwise and not hooked)


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
    if _is_dpt_head(head):
        head[2:].to(memory_format=torch.channels_last)
        head.__class__ = _BandedHead
    elif _is_upsampling_head(head):  # hooked (Zoe's): whole, channels-last from the upsampling on
        head[2].to(memory_format=torch.channels_last)
        head[1] = torch.nn.Sequential(_ChannelsLast(), head[1])
    return len(blocks)
