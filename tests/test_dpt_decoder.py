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
