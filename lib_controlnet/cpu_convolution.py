"""Convolutions on the CPU: per shape, the faster of PyTorch's two CPU kernels, picked by timing both once.

PyTorch runs a float convolution on the CPU either through oneDNN (its default) or through its own
im2col + GEMM kernel. Neither wins everywhere: oneDNN is faster on large images with few channels, but on the
small, wide layers of a ControlNet's lower blocks (1280 channels at 8x8 or 4x4 latents) and on 1x1
convolutions the GEMM kernel is up to several times faster on the CPUs measured here (see
benchmarks/bench_hook.py). Which one wins depends on the CPU and the thread count, so nothing is
hard-coded: the first call of each shape times both and remembers the winner, the way cudnn.benchmark does on
GPUs. Both kernels compute the same convolution; only the order of the float additions differs.

Only inference of ungrouped, zero-padded convolutions is touched (no gradient recorded; grouped convolutions
such as depthwise ones are far slower on the GEMM kernel); training, other devices and other modules run as
before.
`use_fastest_kernels(module)` switches the class of the module's plain nn.Conv2d layers to a subclass, so
weights, state-dict keys and `isinstance` checks stay as they were.
"""
from __future__ import annotations

import time

import torch
from torch import nn

# The default kernel keeps its place unless the other is clearly faster: a near tie is timing noise.
_MARGIN = 0.85
# The GEMM kernel unfolds the input (im2col) into a buffer of in_channels * kh * kw values per output pixel. Past
# this size it is slow as well as large (gigabytes for a 7x7 layer on a 512 px image), so it is not even tried.
_MAX_UNFOLD_BYTES = 32 * 2 ** 20
_choices: dict[tuple, bool] = {}  # shape key -> use oneDNN (plain dict writes are atomic: no lock needed)


def use_fastest_kernels(module: nn.Module) -> nn.Module:
    """Let every plain Conv2d in `module` run on the faster CPU kernel for its shape. Idempotent."""
    for child in module.modules():
        if type(child) is nn.Conv2d:
            child.__class__ = FastestKernelConv2d
    return module


def _key(x: torch.Tensor, conv: nn.Conv2d) -> tuple:
    return (tuple(x.shape), x.dtype, x.is_contiguous(memory_format=torch.channels_last), tuple(conv.weight.shape),
            conv.stride, conv.padding, conv.dilation, torch.get_num_threads())


def _unfold_bytes(x: torch.Tensor, conv: nn.Conv2d) -> int:
    out_pixels = 1
    for side, kernel, stride, pad, dilation in zip(x.shape[-2:], conv.kernel_size, conv.stride, conv.padding,
                                                   conv.dilation):
        out_pixels *= max(1, (side + 2 * pad - dilation * (kernel - 1) - 1) // stride + 1)
    return x.shape[0] * conv.in_channels * conv.kernel_size[0] * conv.kernel_size[1] * out_pixels * x.element_size()


def _gemm_conv(x, weight, bias, conv: nn.Conv2d):
    """PyTorch's own im2col + GEMM kernel, called directly: switching oneDNN off through the global flag
    would also switch it off for convolutions running meanwhile in other threads."""
    if conv.dilation == (1, 1):
        return torch._C._nn.thnn_conv2d(x, weight, conv.kernel_size, bias, conv.stride, conv.padding)
    return torch._C._nn.slow_conv_dilated2d(x, weight, conv.kernel_size, bias, conv.stride, conv.padding,
                                            conv.dilation)


def _timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


class FastestKernelConv2d(nn.Conv2d):
    """nn.Conv2d whose CPU inference runs on the kernel that was faster for its input shape."""

    def _conv_forward(self, input, weight, bias):
        default = lambda: super(FastestKernelConv2d, self)._conv_forward(input, weight, bias)  # noqa: E731
        if (input.device.type != "cpu" or self.groups != 1 or self.padding_mode != "zeros"
                or isinstance(self.padding, str) or input.dim() != 4
                or (torch.is_grad_enabled() and (input.requires_grad or weight.requires_grad))
                or _unfold_bytes(input, self) > _MAX_UNFOLD_BYTES):
            return default()
        key = _key(input, self)
        onednn = _choices.get(key)
        if onednn is None:
            return self._choose(key, input, weight, bias, default)
        return default() if onednn else _gemm_conv(input, weight, bias, self)

    def _choose(self, key, input, weight, bias, default):
        """First call of a shape: time both kernels and remember the faster."""
        gemm = lambda: _gemm_conv(input, weight, bias, self)  # noqa: E731
        # one warm-up each (oneDNN builds its kernel on first use), then one timed call each
        default()
        try:
            gemm()
        except RuntimeError:  # a dtype the GEMM kernel lacks: the default is the only choice
            _choices[key] = True
            return default()
        onednn_out, with_onednn = _timed(default)
        gemm_out, with_gemm = _timed(gemm)
        onednn = _choices[key] = not with_gemm < _MARGIN * with_onednn
        # the winner's output: the float sums differ between kernels, and every later call runs the winner
        return onednn_out if onednn else gemm_out


def chosen_kernels() -> dict[tuple, str]:
    """What was picked so far, by shape key (for benchmarks and tests)."""
    return {key: ("oneDNN" if onednn else "GEMM") for key, onednn in _choices.items()}


def forget_choices() -> None:
    _choices.clear()
