"""annotators.winograd_conv: large 3x3 convolutions through NNPACK give Conv2d's result, and only where they pay."""
import copy

import pytest
import torch
from torch import nn

from annotators import winograd_conv

pytestmark = pytest.mark.skipif(not winograd_conv.available(), reason="this PyTorch build or CPU has no NNPACK")


def _nnpack_calls(module, x) -> int:
    with torch.profiler.profile() as profile:
        module(x)
    return sum(event.count for event in profile.key_averages() if event.key == "aten::_nnpack_spatial_convolution")


def _pair(in_channels, out_channels, **kw):
    torch.manual_seed(0)
    conv = nn.Conv2d(in_channels, out_channels, 3, **kw).eval()
    fast = copy.deepcopy(conv)
    assert winograd_conv.install(fast) == 1
    return conv, fast


@pytest.mark.parametrize("padding,bias,batch,channels_last", [(1, True, 1, False), (0, False, 2, False),
                                                              (1, True, 2, True)])
def test_equals_conv2d_where_it_runs(padding, bias, batch, channels_last):
    out_channels = 256 if channels_last else 128  # a channels-last input needs more output channels to pay
    conv, fast = _pair(64, out_channels, padding=padding, bias=bias)
    x = torch.randn(batch, 64, 64, 96)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
        conv.to(memory_format=torch.channels_last)
        fast.to(memory_format=torch.channels_last)
    with torch.inference_mode():
        expected = conv(x)
        got = fast(x)
        assert _nnpack_calls(fast, x) == batch  # one image per call
    # Winograd F(6x6, 3x3) rounds differently: within 1e-4 of the largest output
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-4 * expected.abs().max().item())
    assert got.is_contiguous()  # NCHW out, whatever came in


@pytest.mark.parametrize("padding,height", [(1, 64), (0, 66), (1, 67)])
def test_large_outputs_run_in_bands_of_rows(monkeypatch, padding, height):
    """Bands of 5 output rows (the last one shorter where the height does not divide): each band reads the rows
    its outputs need beyond it and nothing from its own zero padding shows."""
    conv, fast = _pair(64, 128, padding=padding)
    monkeypatch.setattr(winograd_conv, "MAX_CALL_OUTPUTS", 128 * 96 * 5)
    x = torch.randn(1, 64, height, 96 + 2 - 2 * padding)
    with torch.inference_mode():
        expected = conv(x)
        assert _nnpack_calls(fast, x) == -(-expected.shape[2] // 5)
        torch.testing.assert_close(fast(x), expected, rtol=0, atol=1e-4 * expected.abs().max().item())


@pytest.mark.parametrize("case", ["small map", "training", "float64", "channels-last, 128 out", "autocast"])
def test_falls_back_to_conv2d_where_it_would_not_pay(case):
    conv, fast = _pair(64, 128, padding=1)
    x = torch.randn(1, 64, 64, 96)
    context = torch.inference_mode()
    if case == "small map":
        x = torch.randn(1, 64, 48, 64)
    elif case == "training":
        context = torch.enable_grad()
        x.requires_grad_(True)
    elif case == "float64":
        conv.double(), fast.double()
        x = x.double()
    elif case == "channels-last, 128 out":
        x = x.contiguous(memory_format=torch.channels_last)
    elif case == "autocast":
        context = torch.autocast("cpu", dtype=torch.bfloat16)
    with context:
        assert _nnpack_calls(fast, x) == 0
        torch.testing.assert_close(fast(x), conv(x), rtol=0, atol=0)
    if case == "training":
        fast(x).sum().backward()
        assert x.grad is not None


def test_installs_only_on_plain_3x3_convolutions_with_enough_channels():
    layers = nn.Sequential(nn.Conv2d(64, 128, 3, padding=1), nn.Conv2d(128, 128, 1), nn.Conv2d(128, 128, 3, stride=2),
                           nn.Conv2d(128, 128, 3, dilation=2), nn.Conv2d(128, 128, 3, groups=2),
                           nn.Conv2d(128, 128, 3, padding=1, padding_mode="reflect"), nn.Conv2d(128, 64, 3),
                           nn.Conv2d(32, 128, 3), nn.Conv2d(128, 128, 5), nn.Conv2d(128, 128, 3, padding="same"),
                           nn.Conv2d(128, 128, 3, padding=2))
    keys = list(layers.state_dict())
    assert winograd_conv.install(layers) == 1
    assert type(layers[0]) is winograd_conv.WinogradConv2d
    assert all(type(layer) is nn.Conv2d for layer in layers[1:])
    assert list(layers.state_dict()) == keys
