"""diffusers ControlNetModel configs: the shipped ones (no hub), and one fitted to a given set of weights.

The architecture is read from the weights (channels, blocks with attention, transformer depths, projections,
conditioning embedding); what weights cannot tell (number of attention heads, SDXL's time-embedding width)
comes from the base's shipped config, following the released models' conventions (SD1: 8 heads;
SD2/SDXL: heads of 64 channels).
"""
from __future__ import annotations

import copy
import inspect
import json
import re
from functools import lru_cache
from pathlib import Path

from lib_controlnet.models.errors import ModelFileError
from lib_controlnet.settings import SHIPPED_CONFIGS_DIR

CONFIGS_DIR = SHIPPED_CONFIGS_DIR / "controlnet"
BASES = ("sd15", "sd2", "sdxl", "sdxl_mid", "sdxl_small")
BASE_LABELS = {"sd15": "SD1.5", "sd2": "SD2.x", "sdxl": "SDXL", "sdxl_mid": "SDXL (mid)", "sdxl_small": "SDXL (small)"}


def config_dir(base: str) -> Path:
    """A folder holding only config.json (what `from_single_file(config=...)` and `from_config` accept)."""
    return CONFIGS_DIR / base


@lru_cache(maxsize=None)
def _shipped(base: str) -> str:
    return (config_dir(base) / "config.json").read_text(encoding="utf-8")


def shipped_config(base: str) -> dict:
    if base not in BASES:
        raise KeyError(f"unknown base {base!r}; known: {', '.join(BASES)}")
    return json.loads(_shipped(base))


@lru_cache(maxsize=None)
def _accepted_fields() -> frozenset:
    from diffusers import ControlNetModel

    return frozenset(inspect.signature(ControlNetModel.__init__).parameters) - {"self"}


def clean_config(config: dict) -> dict:
    """Only the fields this diffusers version's ControlNetModel accepts (older/newer configs carry others)."""
    return {k: v for k, v in config.items() if k in _accepted_fields()}


def _levels(shapes) -> int:
    return 1 + max(int(m.group(1)) for k in shapes if (m := re.match(r"down_blocks\.(\d+)\.", k)))


def _depth(shapes, prefix: str) -> int:
    pattern = re.compile(re.escape(prefix) + r"transformer_blocks\.(\d+)\.")  # once, not once per key
    found = {int(m.group(1)) for k in shapes if (m := pattern.match(k))}
    return len(found)


def detect_base(shapes: dict[str, tuple]) -> str:
    """Base family from diffusers-named shapes: SDXL has the text-time embedding; SD2 linear projections."""
    try:
        levels = _levels(shapes)
    except ValueError:
        raise ModelFileError("The weights have no down blocks, so they are not a ControlNet.") from None
    proj = next((s for k, s in shapes.items() if k.endswith("attentions.0.proj_in.weight")), None)
    if any(k.startswith("add_embedding.") for k in shapes):
        depths = [_depth(shapes, f"down_blocks.{i}.attentions.0.") for i in range(levels)]
        if not any(depths):
            return "sdxl_small"
        return "sdxl" if max(depths) > 1 else "sdxl_mid"
    to_k = next((s for k, s in shapes.items() if k.endswith("attn2.to_k.weight")), None)
    if to_k is not None and to_k[1] in (768, 1024):  # the text encoders of SD1 (CLIP L) and SD2 (OpenCLIP H)
        return "sd15" if to_k[1] == 768 else "sd2"
    if proj is not None and len(proj) == 2:  # other widths (small test models): SD2 projects linearly
        return "sd2"
    return "sd15"


def config_for(shapes: dict[str, tuple], base: str | None = None) -> dict:
    """A ControlNetModel config that fits these diffusers-named weight shapes."""
    base = base or detect_base(shapes)
    config = copy.deepcopy(shipped_config(base))
    try:
        levels = _levels(shapes)
        channels = [shapes[f"down_blocks.{i}.resnets.0.conv1.weight"][0] for i in range(levels)]
        has_attention = [any(k.startswith(f"down_blocks.{i}.attentions.") for k in shapes) for i in range(levels)]
        lpb = 1 + max(int(m.group(1)) for k in shapes if (m := re.match(r"down_blocks\.0\.resnets\.(\d+)\.", k)))
        mid_depth = _depth(shapes, "mid_block.attentions.0.")
        hint = [shapes["controlnet_cond_embedding.conv_in.weight"]]
        n_hint_blocks = len({m.group(1) for k in shapes if (m := re.match(r"controlnet_cond_embedding\.blocks\.(\d+)\.", k))})
        hint += [shapes[f"controlnet_cond_embedding.blocks.{i}.weight"] for i in range(1, n_hint_blocks, 2)]
        config.update(
            in_channels=shapes["conv_in.weight"][1],
            conditioning_channels=hint[0][1],
            conditioning_embedding_out_channels=[s[0] for s in hint],
            block_out_channels=channels,
            layers_per_block=lpb,
            down_block_types=["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in has_attention],
            # a middle attention with zero transformer layers (the released SDXL small) still has its norm
            mid_block_type=("UNetMidBlock2DCrossAttn" if any(k.startswith("mid_block.attentions.") for k in shapes)
                            else "UNetMidBlock2D"),
            norm_num_groups=config.get("norm_num_groups", 32),
        )
    except (KeyError, ValueError, IndexError) as error:
        raise ModelFileError(f"The ControlNet weights are incomplete (missing {error}).") from None
    to_k = next((s for k, s in shapes.items() if k.endswith("attn2.to_k.weight")), None)
    if to_k is not None:
        config["cross_attention_dim"] = to_k[1]
        proj = next(s for k, s in shapes.items() if k.endswith(".proj_in.weight"))
        config["use_linear_projection"] = len(proj) == 2
    depths = [_depth(shapes, f"down_blocks.{i}.attentions.0.") for i in range(levels)]
    if not has_attention[-1]:
        depths[-1] = mid_depth  # diffusers takes the mid block's depth from the last level
    config["transformer_layers_per_block"] = depths[0] if len(set(depths)) == 1 else depths
    if "add_embedding.linear_1.weight" in shapes:
        config["addition_embed_type"] = "text_time"
        config["projection_class_embeddings_input_dim"] = shapes["add_embedding.linear_1.weight"][1]
    else:
        config.update(addition_embed_type=None, addition_time_embed_dim=None, projection_class_embeddings_input_dim=None)
    if base == "sd15":
        config["attention_head_dim"] = 8  # diffusers' name for the number of heads (SD1: 8 heads)
    else:
        config["attention_head_dim"] = [max(1, c // 64) for c in channels]  # heads of 64 channels
    return config
