"""Layer rewrites that runtime.prepare applies to every annotator network: same outputs, safe where they apply."""
import copy

import numpy as np
import pytest
import torch
from torch import nn

from annotators import instance_norm, one_channel_conv, runtime, small_map_conv


@pytest.mark.parametrize("kernel,padding,bias,batch", [(7, 0, True, 1), (3, 1, False, 2), (5, 2, True, 1),
                                                       ((3, 5), (1, 2), True, 2)])
def test_one_channel_conv_equals_conv2d(kernel, padding, bias, batch):
    torch.manual_seed(0)
    conv = nn.Conv2d(6, 1, kernel, padding=padding, bias=bias).eval()
    fast = copy.deepcopy(conv)
    assert one_channel_conv.install(fast) == 1
    x = torch.randn(batch, 6, 11, 13)
    with torch.inference_mode():
        torch.testing.assert_close(fast(x), conv(x), rtol=1e-5, atol=1e-5)
    x.requires_grad_(True)
    fast(x).sum().backward()  # training takes PyTorch's own path
    assert x.grad is not None


def test_one_channel_conv_leaves_other_convolutions_alone():
    layers = nn.Sequential(nn.Conv2d(4, 2, 7), nn.Conv2d(2, 1, 1), nn.Conv2d(2, 1, 3, stride=2),
                           nn.Conv2d(2, 1, 3, dilation=2), nn.Conv2d(2, 1, 3, padding_mode="reflect", padding=1))
    assert one_channel_conv.install(layers) == 0


@pytest.mark.parametrize("kernel,stride,padding,extra,bias", [(4, 2, 1, 0, True), (3, 2, 1, 1, False),
                                                              (5, 3, 2, 2, True), ((4, 3), (2, 1), (1, 0), 0, True)])
def test_one_channel_transposed_conv_equals_conv_transpose2d(kernel, stride, padding, extra, bias):
    torch.manual_seed(0)
    conv = nn.ConvTranspose2d(6, 1, kernel, stride, padding, output_padding=extra, bias=bias).eval()
    fast = copy.deepcopy(conv)
    assert one_channel_conv.install(fast) == 1 and type(fast) is one_channel_conv.OneChannelConvTranspose2d
    x = torch.randn(2, 6, 11, 13).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        expected = conv(x)
        got = fast(x)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
        nchw = x.contiguous()  # oneDNN's own kernel: the very same numbers
        torch.testing.assert_close(fast(nchw), conv(nchw), rtol=0, atol=0)


def test_one_channel_transposed_conv_leaves_other_ones_alone():
    layers = nn.Sequential(nn.ConvTranspose2d(4, 2, 4, 2, 1), nn.ConvTranspose2d(2, 1, 3, dilation=2),
                           nn.ConvTranspose2d(2, 2, 3, groups=2))
    assert one_channel_conv.install(layers) == 0


@pytest.mark.parametrize("kernel,stride,padding,extra,size", [(4, 2, 1, 0, (4, 6)), (3, 2, 1, 1, (5, 7)),
                                                              ((4, 3), (2, 1), (1, 0), 0, (8, 12))])
@pytest.mark.parametrize("channels_last,batch", [(True, 1), (False, 2)])
def test_small_map_transposed_conv_equals_conv_transpose2d(kernel, stride, padding, extra, size, channels_last,
                                                           batch):
    torch.manual_seed(0)
    reference = nn.Sequential(nn.ConvTranspose2d(6, 5, kernel, stride, padding, output_padding=extra)).eval()
    conv = runtime.prepare(copy.deepcopy(reference))  # channels-last weights, as in every prepared network
    assert type(conv[0]) is small_map_conv.SmallMapConvTranspose2d
    x = torch.randn(batch, 6, *size)
    x = x.contiguous(memory_format=torch.channels_last) if channels_last else x
    with torch.inference_mode():
        got = conv(x)
        torch.testing.assert_close(got, reference(x), rtol=1e-5, atol=1e-5)
    assert got.is_contiguous(memory_format=torch.channels_last) == channels_last


def test_small_map_transposed_conv_keeps_onednn_outside_its_range(monkeypatch):
    conv = nn.ConvTranspose2d(4, 3, 4, 2, 1).eval()
    small_map_conv.install(conv)
    nchw_weight = copy.deepcopy(conv)
    conv.to(memory_format=torch.channels_last)
    calls = []
    fold = torch.nn.functional.fold
    monkeypatch.setattr(small_map_conv.F, "fold", lambda *args, **kwargs: calls.append(1) or fold(*args, **kwargs))
    with torch.inference_mode():
        for size in [(2, 3), (12, 12), (4, 4)]:
            conv(torch.randn(1, 4, *size))
        assert len(calls) == 1  # 6 and 144 pixels are outside 16..128
        nchw_weight(torch.randn(1, 4, 4, 4))
    assert len(calls) == 1  # a weight that is not channels-last would be copied on every call
    assert small_map_conv.install(nn.Sequential(nn.ConvTranspose2d(4, 1, 4, 2, 1),
                                                nn.ConvTranspose2d(2, 2, 3, groups=2),
                                                nn.ConvTranspose2d(2, 2, 3, dilation=2))) == 0


def _network():
    class Residual(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(8, 8, 3, padding=1)
            self.relu = nn.ReLU()  # not in a Sequential: its input is also the residual

        def forward(self, x):
            return self.relu(x) + self.conv(x)

    torch.manual_seed(0)
    return nn.Sequential(nn.ReLU(), nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), Residual(),
                         nn.Conv2d(8, 8, 1), nn.LeakyReLU(0.2), nn.Conv2d(8, 8, 1), nn.ReLU6()).eval()


def test_prepare_runs_activations_in_place_only_on_fresh_outputs():
    reference = _network()
    with torch.no_grad():
        for norm in reference.modules():
            if isinstance(norm, nn.BatchNorm2d):
                norm.running_mean.uniform_(-1, 1)
                norm.running_var.uniform_(0.5, 2)
    net = runtime.prepare(copy.deepcopy(reference), channels_last=False)
    assert type(net[2]) is nn.Identity  # the batch norm was folded: the ReLU still sees the conv's own output
    assert [net[i].inplace for i in (0, 3, 6, 8)] == [False, True, True, True]
    assert net[4].relu.inplace is False
    x = torch.randn(2, 3, 9, 9)
    kept = x.clone()
    with torch.inference_mode():
        torch.testing.assert_close(net(x), reference(x), rtol=1e-5, atol=1e-5)
    assert torch.equal(x, kept)  # the first ReLU must not write into the caller's tensor


def test_activation_after_a_hooked_layer_keeps_its_own_output():
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()).eval()
    seen = []
    net[0].register_forward_hook(lambda module, args, out: seen.append(out))
    runtime.activations_in_place(net)
    assert net[1].inplace is False
    with torch.inference_mode():
        net(torch.randn(1, 3, 8, 8))
    assert (seen[0] < 0).any()  # the hook's copy still holds the negative values


def test_hooked_activation_sees_its_input_unchanged():
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()).eval()
    inputs = []
    net[1].register_forward_hook(lambda module, args, out: inputs.append(args[0]))
    runtime.activations_in_place(net)
    assert net[1].inplace is False
    with torch.inference_mode():
        net(torch.randn(1, 3, 8, 8))
    assert (inputs[0] < 0).any()


@pytest.mark.parametrize("channels,batch", [(16, 1), (96, 2)])  # both ways of summing squares
def test_channels_last_instance_norm_equals_instance_norm(channels, batch):
    torch.manual_seed(0)
    reference = nn.Sequential(nn.Conv2d(3, channels, 3), nn.InstanceNorm2d(channels), nn.ReLU()).eval()
    fast = copy.deepcopy(reference)
    assert instance_norm.install(fast) == 1
    x = torch.randn(batch, 3, 37, 29) * 3 + 1
    with torch.inference_mode():
        expected = reference(x)
        got = fast.to(memory_format=torch.channels_last)(x.contiguous(memory_format=torch.channels_last))
        assert got.is_contiguous(memory_format=torch.channels_last)
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(fast(x.contiguous()), expected, rtol=1e-4, atol=1e-5)  # NCHW: PyTorch's own
        half = reference[0](x).contiguous(memory_format=torch.channels_last).bfloat16()
        torch.testing.assert_close(fast[1](half), reference[1](half))  # bfloat16: PyTorch's own


def test_channels_last_instance_norm_only_where_its_input_is_fresh():
    hooked = nn.Conv2d(4, 4, 1)
    hooked.register_forward_hook(lambda module, args, out: None)  # a hook could keep the conv's output
    layers = nn.Sequential(nn.InstanceNorm2d(4), nn.ReLU(), nn.InstanceNorm2d(4), nn.Conv2d(4, 4, 1),
                           nn.InstanceNorm2d(4, affine=True), hooked, nn.InstanceNorm2d(4),
                           nn.ConvTranspose2d(4, 4, 2), nn.InstanceNorm2d(4))
    assert instance_norm.install(layers) == 1
    assert type(layers[8]) is instance_norm.ChannelsLastInstanceNorm


@pytest.mark.parametrize("count", [1, 3])
def test_to_batch_is_channels_last_that_pytorch_recognises(count):
    """A zero batch stride (numpy's [None] on one image) passes is_contiguous(channels_last) yet makes padding and
    convolutions with NCHW weights fall back to NCHW: MiDaS's whole stem ran in it."""
    images = [np.random.default_rng(i).integers(0, 256, (12, 20, 3), dtype=np.uint8) for i in range(count)]
    batch = runtime.to_batch(images, scale=1 / 127.5, offset=-1.0)
    assert batch.stride() == (12 * 20 * 3, 1, 20 * 3, 3)
    padded = torch.nn.functional.pad(batch, (1, 1, 1, 1))
    assert padded.is_contiguous(memory_format=torch.channels_last) and not padded.is_contiguous()
    out = torch.nn.functional.conv2d(batch, torch.randn(8, 3, 3, 3))
    assert out.is_contiguous(memory_format=torch.channels_last) and not out.is_contiguous()
    expected = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    torch.testing.assert_close(batch, expected)
