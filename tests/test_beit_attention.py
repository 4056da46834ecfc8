"""annotators.beit_attention on a small BEiT patched by controlnet-aux's own code (Zoe's backbone, in miniature):
the fused attention gives the same features as controlnet-aux's, at the native window size and at others."""
import torch

from annotators import beit_attention
from annotators.runtime import aux_module


def _small_patched_beit():
    from timm.models.beit import Beit

    torch.manual_seed(0)
    model = Beit(img_size=64, patch_size=16, embed_dim=64, depth=4, num_heads=4, use_abs_pos_emb=False,
                 use_rel_pos_bias=True, init_values=0.1, num_classes=0).eval()
    with torch.no_grad():
        for block in model.blocks:  # timm starts the bias tables at zero, which would hide a wrong gather
            block.attn.relative_position_bias_table.normal_()
    beit = aux_module("zoe.zoedepth.models.base_models.midas_repo.midas.backbones.beit")
    return beit._make_beit_backbone(model, features=[16, 32, 64, 64], size=[64, 64], hooks=[0, 1, 2, 3],
                                    vit_features=64).model


def test_fused_attention_equals_controlnet_aux_at_every_window_size():
    model = _small_patched_beit()
    inputs = [torch.randn(1, 3, 64, 64), torch.randn(2, 3, 48, 96), torch.randn(1, 3, 112, 80)]
    with torch.inference_mode():
        theirs = [model.forward_features(x) for x in inputs]
        assert beit_attention.install(model) == 4
        ours = [model.forward_features(x) for x in inputs]
        again = model.forward_features(inputs[1])  # the resized table kept for this window
    for a, b in zip(ours, theirs):
        assert a.shape == b.shape
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(again, ours[1], rtol=0, atol=0)
    assert len(model.blocks[0].attn._studio_tables) == 3
