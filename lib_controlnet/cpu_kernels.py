"""ControlNet layers on the CPU: per shape, the faster of PyTorch's two CPU kernels, picked by timing both once.

Convolutions: PyTorch runs a float convolution on the CPU either through oneDNN (its default) or through its
own im2col + GEMM kernel. Neither wins everywhere: oneDNN is faster on large images with few channels, but on
the small, wide layers of a ControlNet's lower blocks (1280 channels at 8x8 or 4x4 latents) and on 1x1
convolutions the GEMM kernel is up to several times faster on the CPUs measured here.
Linear layers: PyTorch's default is a BLAS GEMM (MKL where built with it); oneDNN's matmul (the op PyTorch's
own compiler emits for CPU linears) was 5-30 % faster on the transformer layers of an SDXL-size ControlNet
here, which carry two thirds of its time (see benchmarks/bench_hook.py).
Which kernel wins depends on the CPU and the thread count, so nothing is hard-coded: the first call of each
shape times both and remembers the winner, the way cudnn.benchmark does on GPUs. Both kernels compute the same
result; only the order of the float additions differs, and every later call of a shape runs the same kernel,
so a repeated job gives the same bits.

Only inference is touched (no gradient recorded; for convolutions only ungrouped, zero-padded ones: grouped
convolutions such as depthwise ones are far slower on the GEMM kernel); training, other devices and other
modules run as before. `use_fastest_kernels(module)` switches the class of the module's plain nn.Conv2d and
nn.Linear layers to a subclass, so weights, state-dict keys and `isinstance` checks stay as they were.
"""
from __future__ import annotations

import time
from typing import Callable

import torch
from torch import nn
import torch.nn.functional as F

# The default kernel keeps its place unless the other is clearly faster: a near tie is timing noise.
_MARGIN = 0.85
# Linear layers: the two kernels are closer than convolutions' (5-30 %), so the margin is tighter; a choice by
# one timed call each still needs a clear win.
_LINEAR_MARGIN = 0.95
# The GEMM kernel unfolds the input (im2col) into a buffer of in_channels * kh * kw values per output pixel. Past
# this size it is slow as well as large (gigabytes for a 7x7 layer on a 512 px image), so it is not even tried.
_MAX_UNFOLD_BYTES = 32 * 2 ** 20
_choices: dict[tuple, bool] = {}  # shape key -> keep the default (plain dict writes are atomic: no lock needed)
# oneDNN's linear as PyTorch's compiler calls it; absent from builds without oneDNN
_onednn_linear = getattr(getattr(torch.ops, "mkldnn", None), "_linear_pointwise", None)


def use_fastest_kernels(module: nn.Module) -> nn.Module:
    """Let every plain Conv2d and Linear in `module` run on the faster CPU kernel for its shape. Idempotent."""
    for child in module.modules():
        if type(child) is nn.Conv2d:
            child.__class__ = FastestKernelConv2d
        elif type(child) is nn.Linear and torch.backends.mkldnn.is_available() and _onednn_linear is not None:
            child.__class__ = FastestKernelLinear
    return module


def _inference(input: torch.Tensor, weight: torch.Tensor) -> bool:
    return input.device.type == "cpu" and not (torch.is_grad_enabled() and (input.requires_grad or weight.requires_grad))


def _run_chosen(key: tuple, default: Callable, other: Callable, margin: float):
    """The kernel chosen for `key`; on its first call, time both and remember the faster."""
    keep_default = _choices.get(key)
    if keep_default is not None:
        return default() if keep_default else other()
    # one warm-up each (oneDNN builds its kernel on first use), then one timed call each
    default()
    try:
        other()
    except RuntimeError:  # a dtype or layout the other kernel lacks: the default is the only choice
        _choices[key] = True
        return default()
    default_out, with_default = _timed(default)
    other_out, with_other = _timed(other)
    keep_default = _choices[key] = not with_other < margin * with_default
    # the winner's output: the float sums differ between kernels, and every later call runs the winner
    return default_out if keep_default else other_out


def _timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


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


class FastestKernelConv2d(nn.Conv2d):
    """nn.Conv2d whose CPU inference runs on the kernel that was faster for its input shape."""

    def _conv_forward(self, input, weight, bias):
        default = lambda: super(FastestKernelConv2d, self)._conv_forward(input, weight, bias)  # noqa: E731
        if (not _inference(input, weight) or self.groups != 1 or self.padding_mode != "zeros"
                or isinstance(self.padding, str) or input.dim() != 4
                or _unfold_bytes(input, self) > _MAX_UNFOLD_BYTES):
            return default()
        key = ("conv", tuple(input.shape), input.dtype, input.is_contiguous(memory_format=torch.channels_last),
               tuple(weight.shape), self.stride, self.padding, self.dilation, torch.get_num_threads())
        return _run_chosen(key, default, lambda: _gemm_conv(input, weight, bias, self), _MARGIN)


class FastestKernelLinear(nn.Linear):
    """nn.Linear whose CPU inference runs on BLAS or oneDNN, whichever was faster for its input shape."""

    def forward(self, input):
        default = lambda: F.linear(input, self.weight, self.bias)  # noqa: E731
        if not _inference(input, self.weight) or input.dim() < 2:
            return default()
        # a strided input (e.g. a transformer's proj_in reading a permuted feature map): oneDNN gets a contiguous
        # copy, as F.linear makes one inside; both paths are timed with their copies
        contiguous = input.is_contiguous()
        key = ("linear", tuple(input.shape), input.dtype, contiguous, tuple(self.weight.shape),
               self.bias is not None, torch.get_num_threads())
        return _run_chosen(key, default, lambda: _onednn_linear(input if contiguous else input.contiguous(),
                                                                self.weight, self.bias, "none", [], ""),
                           _LINEAR_MARGIN)


def chosen_kernels() -> dict[tuple, str]:
    """What was picked so far, by shape key (for benchmarks and tests)."""
    other = {"conv": "GEMM", "linear": "oneDNN"}
    return {key: ({"conv": "oneDNN", "linear": "BLAS"}[key[0]] if keep else other[key[0]])
            for key, keep in _choices.items()}


def forget_choices() -> None:
    _choices.clear()
