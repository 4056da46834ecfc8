"""A new ControlNet's size: the full copy of the UNet's encoder, or the smaller shapes of the released SDXL "mid"
and "small" ControlNets (fewer transformer layers; small has none in the down blocks).

Each size is a change to the full copy's config; the smaller network starts from the full copy's weights, which
hold every tensor it has (the first transformer layers, the resnets, the zero convolutions).
"""
from __future__ import annotations

SIZES = ("full", "mid", "small")


def _mid(config: dict) -> dict:
    # one transformer layer wherever the encoder has attention (the released SDXL mid: [0, 1, 1])
    layers = [0 if kind == "DownBlock2D" else 1 for kind in config["down_block_types"]]
    return {"transformer_layers_per_block": layers}


def _small(config: dict) -> dict:
    # no attention in the down blocks; the middle block keeps one transformer layer (released SDXL small: [0, 0, 1])
    levels = len(config["down_block_types"])
    return {"down_block_types": ["DownBlock2D"] * levels, "transformer_layers_per_block": [0] * (levels - 1) + [1]}


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
