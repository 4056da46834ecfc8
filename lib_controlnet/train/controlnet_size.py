"""A new ControlNet's size: the full copy of the UNet's encoder, or the smaller shapes of the released SDXL "mid"
and "small" ControlNets (mid: one transformer layer in the last level and the middle; small: none at all), as
diffusers' single-file loader and ComfyUI tell them apart.

Each size is a change to the full copy's config; the smaller network starts from the full copy's weights, which
hold every tensor it has (the first transformer layers, the resnets, the zero convolutions).
"""
from __future__ import annotations

SIZES = ("full", "mid", "small")


def _mid(config: dict) -> dict:
    # the released SDXL mid (diffusers/controlnet-*-sdxl-1.0-mid): the full copy's blocks, one transformer layer
    # in the last level and the middle, none in the others ([0, 0, 1]; its level-1 attentions keep norm and
    # projections, which is how diffusers' single-file loader tells mid from small)
    levels = len(config["down_block_types"])
    return {"transformer_layers_per_block": [0] * (levels - 1) + [1]}


def _small(config: dict) -> dict:
    # the released SDXL small: no attention in the down blocks and none in the middle's attention either (its
    # middle keeps norm and projections around zero transformer layers; ComfyUI's SDXL_small_cnet: depth 0)
    levels = len(config["down_block_types"])
    return {"down_block_types": ["DownBlock2D"] * levels, "transformer_layers_per_block": [0] * levels}


_CHANGES = {"full": lambda config: {}, "mid": _mid, "small": _small}


def controlnet_from_unet(unet, size: str = "full"):
    """A diffusers ControlNetModel initialised from `unet`'s encoder, at `size`."""
    from diffusers import ControlNetModel

    full = ControlNetModel.from_unet(unet)
    changes = _CHANGES[size](dict(full.config))
    if not changes:
        return full
    smaller = ControlNetModel.from_config({**full.config, **changes})
    missing, _unused = smaller.load_state_dict(full.state_dict(), strict=False)
    if missing:  # would leave random layers in a network meant to start as the UNet's copy
        raise RuntimeError(f"the {size} ControlNet has layers the full copy lacks: {missing[:3]}")
    return smaller


# What a ControlNet must share with the UNet it trains beside (its residuals go onto that UNet's blocks)
FIT_KEYS = (("cross_attention_dim", "text-embedding width"), ("addition_embed_type", "added conditioning"),
            ("block_out_channels", "block widths"), ("in_channels", "latent channels"))


def misfit(controlnet, unet) -> str:
    """How `controlnet` differs from `unet` where they must agree ("" when it fits)."""
    for key, what in FIT_KEYS:
        ours, theirs = controlnet.config.get(key), unet.config.get(key)
        if key == "block_out_channels":
            ours, theirs = tuple(ours or ()), tuple(theirs or ())
        if ours != theirs:
            return f"{what} {ours} vs the base's {theirs}"
    return ""
