"""annotators.dpt_decoder: controlnet-aux's DPT fusion blocks and head (MiDaS's and Zoe's copies), rescheduled,
give the same outputs. The whole networks against controlnet-aux: tests/test_annotators_heavy.py."""
import copy

import pytest
import torch
from torch import nn

from annotators import dpt_decoder, runtime
from annotators.runtime import aux_module

BLOCKS = {"midas": "midas.midas.blocks", "zoe": "zoe.zoedepth.models.base_models.midas_repo.midas.blocks"}


class _Decoder(nn.Module):
    """Two fusion blocks and DPT's head, wired as DPTDepthModel.forward wires them."""

    def __init__(self, blocks, expand: bool):
        super().__init__()
        self.scratch = nn.Module()
        features = 16
        self.scratch.refinenet2 = blocks.FeatureFusionBlock_custom(features, nn.ReLU(False), expand=False,
                                                                   align_corners=True)
        self.scratch.refinenet1 = blocks.FeatureFusionBlock_custom(features, nn.ReLU(False), expand=expand,
                                                                   align_corners=True)
        width = features // 2 if expand else features
        self.scratch.output_conv = nn.Sequential(
            nn.Conv2d(width, 8, 3, padding=1), blocks.Interpolate(scale_factor=2, mode="bilinear", align_corners=True),
            nn.Conv2d(8, 4, 3, padding=1), nn.ReLU(True), nn.Conv2d(4, 1, 1), nn.ReLU(True), nn.Identity())
        with torch.no_grad():
            self.scratch.output_conv[4].bias.fill_(0.5)  # so the last ReLU passes most of the depth

    def forward(self, deep, shallow):
        return self.scratch.output_conv(self.scratch.refinenet1(self.scratch.refinenet2(deep), shallow))


@pytest.mark.parametrize("copy_name,expand", [("midas", False), ("zoe", True)])
def test_rescheduled_decoder_gives_the_same_depth(copy_name, expand):
    torch.manual_seed(0)
    reference = _Decoder(aux_module(BLOCKS[copy_name]), expand).eval()
    fast = runtime.prepare(copy.deepcopy(reference))
    assert dpt_decoder.install(fast) == 2
    assert list(fast.state_dict()) == list(reference.state_dict())
    deep, shallow = torch.randn(1, 16, 7, 10), torch.randn(1, 16, 14, 20)
    with torch.inference_mode():
        fused = reference.scratch.refinenet1(reference.scratch.refinenet2(deep), shallow)
        torch.testing.assert_close(fast.scratch.refinenet1(fast.scratch.refinenet2(deep), shallow), fused,
                                   rtol=1e-5, atol=1e-5)
        expected, got = reference(deep, shallow), fast(deep, shallow)
        assert (expected > 0).float().mean() > 0.2  # the head's last ReLU left something to compare
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
        # Zoe's copy also takes the size to upsample to
        block, original = fast.scratch.refinenet2, reference.scratch.refinenet2
        if copy_name == "zoe":
            torch.testing.assert_close(block(deep, size=(13, 21)), original(deep, size=(13, 21)),
                                       rtol=1e-5, atol=1e-5)
    assert type(block).__name__ == "ConvFirstFeatureFusionBlock_custom"
    assert fast.scratch.refinenet1.out_conv.weight.is_contiguous()  # the decoder keeps NCHW
    assert fast.scratch.output_conv[2].weight.is_contiguous(memory_format=torch.channels_last)


def _head(blocks, width=8):
    head = nn.Sequential(
        nn.Conv2d(width, 6, 3, padding=1), blocks.Interpolate(scale_factor=2, mode="bilinear", align_corners=True),
        nn.Conv2d(6, 4, 3, padding=1), nn.ReLU(True), nn.Conv2d(4, 1, 1), nn.ReLU(True), nn.Identity())
    with torch.no_grad():
        head[4].bias.fill_(0.5)
    return head.eval()


@pytest.mark.parametrize("size", [(9, 13), (1, 5), (16, 3)])
def test_the_head_runs_in_bands_of_rows_with_the_same_output(monkeypatch, size):
    torch.manual_seed(1)
    decoder = nn.Module()
    decoder.scratch = nn.Module()
    decoder.scratch.output_conv = _head(aux_module(BLOCKS["midas"]))
    reference = copy.deepcopy(decoder.scratch.output_conv)
    dpt_decoder.install(decoder)
    banded = decoder.scratch.output_conv
    assert type(banded).__name__ == "_BandedHead"
    assert list(banded.state_dict()) == list(reference.state_dict())
    # bands of 5 rows: several per image, a short last one, and edges where the padding row must be zero
    monkeypatch.setattr(dpt_decoder, "HEAD_BAND_ROWS", 5)
    x = torch.randn(2, 8, *size)
    with torch.inference_mode():
        torch.testing.assert_close(banded(x), reference(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("in_h,out_h", [(9, 18), (1, 2), (16, 32), (5, 11)])
def test_upsampled_rows_are_pytorchs_rows(in_h, out_h):
    x = torch.randn(1, 3, in_h, 7).contiguous(memory_format=torch.channels_last)
    whole = torch.nn.functional.interpolate(x, size=(out_h, 15), mode="bilinear", align_corners=True)
    for first, last in [(0, out_h), (0, 1), (out_h // 2, out_h), (max(out_h - 3, 0), out_h - 1)]:
        if last > first:
            rows = dpt_decoder._upsampled_rows(x, first, last, out_h, 15)
            torch.testing.assert_close(rows, whole[:, :, first:last], rtol=1e-6, atol=1e-6)


def test_a_hooked_head_is_left_whole():
    """Zoe reads the head's 32-channel activation through a forward hook: bands would hand it one band."""
    decoder = nn.Module()
    decoder.scratch = nn.Module()
    decoder.scratch.output_conv = _head(aux_module(BLOCKS["zoe"]))
    seen = []
    decoder.scratch.output_conv[3].register_forward_hook(lambda module, inputs, output: seen.append(output.shape))
    dpt_decoder.install(decoder)
    assert type(decoder.scratch.output_conv).__name__ == "Sequential"
    with torch.inference_mode():
        decoder.scratch.output_conv(torch.randn(1, 8, 6, 7))
    assert seen == [torch.Size([1, 4, 12, 14])]
