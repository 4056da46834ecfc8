"""Paired tiny models for the control tests: a diffusers UNet + ControlNet, and the WebUI's real ldm UNetModel
holding the same weights (converted by lib_controlnet.models.unet_diffusers_to_ldm)."""
from __future__ import annotations

import copy

import torch

from lib_controlnet import tiny_models
from lib_controlnet.unit import ControlUnit


def diffusers_pair(family: str, seed: int = 0):
    config = tiny_models.unet_config(family)
    if family == "sdxl":
        # The ldm package holds one transformer depth for all levels; sgm's per-level depths are the only
        # SDXL feature it lacks, so the SDXL-like pair uses depth 1 everywhere.
        config["transformer_layers_per_block"] = 1
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**config)
    tiny_models._randomize_zero_layers(unet, seed)
    controlnet = tiny_models.tiny_controlnet(family, seed=seed + 1, unet=unet)
    return unet.eval(), controlnet.eval()


def ldm_unet_like(unet, family: str):
    """The real ldm UNetModel with the diffusers UNet's structure and weights."""
    from ldm.modules.diffusionmodules.openaimodel import UNetModel

    from lib_controlnet.models import unet_diffusers_to_ldm

    cfg = unet.config
    heads = {}
    if family == "sd15":
        heads = dict(num_heads=cfg.attention_head_dim)
    else:
        heads = dict(num_head_channels=16)  # tiny sd2 / sdxl-like: every attention has 16-channel heads
    mult = tuple(c // cfg.block_out_channels[0] for c in cfg.block_out_channels)
    attention = [2 ** i for i, kind in enumerate(cfg.down_block_types) if kind.startswith("CrossAttn")]
    ldm = UNetModel(
        image_size=16, in_channels=4, model_channels=cfg.block_out_channels[0], out_channels=4, num_res_blocks=2,
        attention_resolutions=attention, channel_mult=mult, use_spatial_transformer=True, transformer_depth=1,
        context_dim=cfg.cross_attention_dim, use_linear_in_transformer=bool(cfg.use_linear_projection),
        use_checkpoint=False, legacy=False, num_classes="continuous" if family == "sdxl" else None, **heads,
    )
    if family == "sdxl":
        # sgm's UNetModel with num_classes="sequential": label_emb = Sequential(Sequential(Linear, SiLU, Linear))
        # on the adm vector y; built here on the ldm class, which has the same forward (emb + label_emb(y)).
        embed_dim = cfg.block_out_channels[0] * 4
        ldm.label_emb = torch.nn.Sequential(torch.nn.Sequential(
            torch.nn.Linear(cfg.projection_class_embeddings_input_dim, embed_dim), torch.nn.SiLU(),
            torch.nn.Linear(embed_dim, embed_dim)))
        ldm.num_classes = "sequential"
    ldm.load_state_dict(unet_diffusers_to_ldm(unet.state_dict()), strict=True)
    return ldm.eval()


def inputs(family: str, batch: int = 2, size: int = 8, seed: int = 5):
    generator = torch.Generator().manual_seed(seed)
    ctx_dim = {"sd15": 32, "sd2": 64, "sdxl": 64}[family]
    data = dict(
        sample=torch.randn(batch, 4, size, size, generator=generator),
        timestep=torch.tensor(421.0),
        context=torch.randn(batch, 77, ctx_dim, generator=generator),
        hint=torch.rand(1, 3, size * 8, size * 8, generator=generator),
    )
    if family == "sdxl":
        data["added"] = dict(text_embeds=torch.randn(batch, 32, generator=generator),
                             time_ids=torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]] * batch))
    return data


def unit(**fields) -> ControlUnit:
    return ControlUnit(**dict(dict(module="none", model="tiny"), **fields))


def clone(module):
    return copy.deepcopy(module)
