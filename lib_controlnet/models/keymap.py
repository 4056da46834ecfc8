"""Key names of ControlNet and UNet weights: ldm (the WebUI's / lllyasviel's layout) <-> diffusers.

Written by hand because diffusers only converts one way (ldm -> diffusers, inside its single-file loader,
which also needs a config up front); we need both directions, bit-exact, for ControlNets and whole UNets.
Only names change: tensors are passed through untouched (the same objects), so a round trip is exact.

The mapping is structural and needs one number, blocks per level (`layers_per_block`, 2 in every SD model),
which is read from the keys themselves. Inside attention blocks (SpatialTransformer / Transformer2DModel) the
names are identical in both layouts; SD1's 1x1-conv proj_in/out and SD2/SDXL's linear ones keep their shapes.
"""
from __future__ import annotations

import re
from functools import lru_cache
from typing import Mapping, TypeVar

from lib_controlnet.models.errors import ModelFileError

T = TypeVar("T")

LDM_CONTROL_PREFIX = "control_model."
LDM_UNET_PREFIX = "model.diffusion_model."

# ResBlock (ldm) <-> ResnetBlock2D (diffusers)
_RESNET_TO_LDM = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
_RESNET_TO_DIFFUSERS = {v: k for k, v in _RESNET_TO_LDM.items()}
_LDM_RES = r"(in_layers\.0|in_layers\.2|emb_layers\.1|out_layers\.0|out_layers\.3|skip_connection)"


class KeyMappingError(ModelFileError):
    """Raised when keys do not fit the ControlNet / UNet layout."""


def strip_prefix(state_dict: Mapping[str, T], prefix: str) -> dict[str, T]:
    """The entries under `prefix`, without it; the input unchanged if no key has it."""
    if not any(k.startswith(prefix) for k in state_dict):
        return dict(state_dict)
    return {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}


def _layers_per_block_diffusers(keys) -> int:
    found = [int(m.group(1)) for k in keys if (m := re.match(r"down_blocks\.0\.resnets\.(\d+)\.", k))]
    if not found:
        raise KeyMappingError("The weights have no down_blocks.0.resnets.* keys, so they are not a diffusers "
                              "ControlNet or UNet.")
    return max(found) + 1


def _layers_per_block_ldm(keys) -> int:
    found = [int(m.group(1)) for k in keys if (m := re.match(r"input_blocks\.(\d+)\.0\.op\.", k))]
    if not found:
        raise KeyMappingError("The weights have no input_blocks.N.0.op (downsampler) keys, so they are not an "
                              "ldm ControlNet or UNet.")
    return min(found) - 1


def _hint_conv_out_index(keys) -> int:
    found = [int(m.group(1)) for k in keys if (m := re.match(r"input_hint_block\.(\d+)\.", k))]
    return max(found) if found else -1


# ---------------------------------------------------------------------------------------------- diffusers -> ldm
def _to_ldm_key(key: str, lpb: int, hint_blocks: int, up_levels_with_attention: set[int]) -> str | None:
    m = re.fullmatch(r"time_embedding\.linear_([12])\.(.+)", key)
    if m:
        return f"time_embed.{0 if m.group(1) == '1' else 2}.{m.group(2)}"
    m = re.fullmatch(r"add_embedding\.linear_([12])\.(.+)", key)
    if m:
        return f"label_emb.0.{0 if m.group(1) == '1' else 2}.{m.group(2)}"
    m = re.fullmatch(r"conv_in\.(.+)", key)
    if m:
        return f"input_blocks.0.0.{m.group(1)}"
    m = re.fullmatch(r"down_blocks\.(\d+)\.resnets\.(\d+)\.(\w+)\.(.+)", key)
    if m and m.group(3) in _RESNET_TO_LDM:
        n = int(m.group(1)) * (lpb + 1) + int(m.group(2)) + 1
        return f"input_blocks.{n}.0.{_RESNET_TO_LDM[m.group(3)]}.{m.group(4)}"
    m = re.fullmatch(r"down_blocks\.(\d+)\.attentions\.(\d+)\.(.+)", key)
    if m:
        n = int(m.group(1)) * (lpb + 1) + int(m.group(2)) + 1
        return f"input_blocks.{n}.1.{m.group(3)}"
    m = re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", key)
    if m:
        return f"input_blocks.{(int(m.group(1)) + 1) * (lpb + 1)}.0.op.{m.group(2)}"
    m = re.fullmatch(r"mid_block\.resnets\.([01])\.(\w+)\.(.+)", key)
    if m and m.group(2) in _RESNET_TO_LDM:
        return f"middle_block.{0 if m.group(1) == '0' else 2}.{_RESNET_TO_LDM[m.group(2)]}.{m.group(3)}"
    m = re.fullmatch(r"mid_block\.attentions\.0\.(.+)", key)
    if m:
        return f"middle_block.1.{m.group(1)}"
    # ControlNet only
    m = re.fullmatch(r"controlnet_cond_embedding\.conv_in\.(.+)", key)
    if m:
        return f"input_hint_block.0.{m.group(1)}"
    m = re.fullmatch(r"controlnet_cond_embedding\.blocks\.(\d+)\.(.+)", key)
    if m:
        return f"input_hint_block.{2 * int(m.group(1)) + 2}.{m.group(2)}"
    m = re.fullmatch(r"controlnet_cond_embedding\.conv_out\.(.+)", key)
    if m:
        return f"input_hint_block.{2 * hint_blocks + 2}.{m.group(1)}"
    m = re.fullmatch(r"controlnet_down_blocks\.(\d+)\.(.+)", key)
    if m:
        return f"zero_convs.{m.group(1)}.0.{m.group(2)}"
    m = re.fullmatch(r"controlnet_mid_block\.(.+)", key)
    if m:
        return f"middle_block_out.0.{m.group(1)}"
    # whole UNet only
    m = re.fullmatch(r"up_blocks\.(\d+)\.resnets\.(\d+)\.(\w+)\.(.+)", key)
    if m and m.group(3) in _RESNET_TO_LDM:
        n = int(m.group(1)) * (lpb + 1) + int(m.group(2))
        return f"output_blocks.{n}.0.{_RESNET_TO_LDM[m.group(3)]}.{m.group(4)}"
    m = re.fullmatch(r"up_blocks\.(\d+)\.attentions\.(\d+)\.(.+)", key)
    if m:
        n = int(m.group(1)) * (lpb + 1) + int(m.group(2))
        return f"output_blocks.{n}.1.{m.group(3)}"
    m = re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)", key)
    if m:
        level = int(m.group(1))
        # ldm puts Upsample after the ResBlock and, where the level has one, the SpatialTransformer.
        sub = 2 if level in up_levels_with_attention else 1
        return f"output_blocks.{level * (lpb + 1) + lpb}.{sub}.conv.{m.group(2)}"
    m = re.fullmatch(r"conv_norm_out\.(.+)", key)
    if m:
        return f"out.0.{m.group(1)}"
    m = re.fullmatch(r"conv_out\.(.+)", key)
    if m:
        return f"out.2.{m.group(1)}"
    return None


def _diffusers_to_ldm(state_dict: Mapping[str, T], what: str) -> dict[str, T]:
    keys = list(state_dict)
    lpb = _layers_per_block_diffusers(keys)
    hint_blocks = len({m.group(1) for k in keys if (m := re.match(r"controlnet_cond_embedding\.blocks\.(\d+)\.", k))})
    up_attn = {int(m.group(1)) for k in keys if (m := re.match(r"up_blocks\.(\d+)\.attentions\.", k))}
    out, unknown = {}, []
    for key, value in state_dict.items():
        new = _to_ldm_key(key, lpb, hint_blocks, up_attn)
        if new is None:
            unknown.append(key)
        else:
            out[new] = value
    if unknown:
        raise KeyMappingError(f"{len(unknown)} {what} weight name(s) have no ldm equivalent, e.g. "
                              f"{', '.join(unknown[:3])}.")
    return out


# ---------------------------------------------------------------------------------------------- ldm -> diffusers
@lru_cache(maxsize=8192)  # detection and loading both map the same names; a second pass is then free
def _to_diffusers_key(key: str, lpb: int, hint_out: int) -> str | None:
    m = re.fullmatch(r"time_embed\.([02])\.(.+)", key)
    if m:
        return f"time_embedding.linear_{1 if m.group(1) == '0' else 2}.{m.group(2)}"
    m = re.fullmatch(r"label_emb\.0\.([02])\.(.+)", key)
    if m:
        return f"add_embedding.linear_{1 if m.group(1) == '0' else 2}.{m.group(2)}"
    m = re.fullmatch(r"input_blocks\.0\.0\.(.+)", key)
    if m:
        return f"conv_in.{m.group(1)}"
    m = re.fullmatch(r"input_blocks\.(\d+)\.0\.op\.(.+)", key)
    if m:
        return f"down_blocks.{int(m.group(1)) // (lpb + 1) - 1}.downsamplers.0.conv.{m.group(2)}"
    m = re.fullmatch(rf"input_blocks\.(\d+)\.0\.{_LDM_RES}\.(.+)", key)
    if m:
        level, j = divmod(int(m.group(1)) - 1, lpb + 1)
        return f"down_blocks.{level}.resnets.{j}.{_RESNET_TO_DIFFUSERS[m.group(2)]}.{m.group(3)}"
    m = re.fullmatch(r"input_blocks\.(\d+)\.1\.(.+)", key)
    if m:
        level, j = divmod(int(m.group(1)) - 1, lpb + 1)
        return f"down_blocks.{level}.attentions.{j}.{m.group(2)}"
    m = re.fullmatch(rf"middle_block\.([02])\.{_LDM_RES}\.(.+)", key)
    if m:
        return f"mid_block.resnets.{0 if m.group(1) == '0' else 1}.{_RESNET_TO_DIFFUSERS[m.group(2)]}.{m.group(3)}"
    m = re.fullmatch(r"middle_block\.1\.(.+)", key)
    if m:
        return f"mid_block.attentions.0.{m.group(1)}"
    # ControlNet only
    m = re.fullmatch(r"input_hint_block\.(\d+)\.(.+)", key)
    if m:
        index = int(m.group(1))
        if index == 0:
            return f"controlnet_cond_embedding.conv_in.{m.group(2)}"
        if index == hint_out:
            return f"controlnet_cond_embedding.conv_out.{m.group(2)}"
        if index % 2 == 0:
            return f"controlnet_cond_embedding.blocks.{(index - 2) // 2}.{m.group(2)}"
        return None
    m = re.fullmatch(r"zero_convs\.(\d+)\.0\.(.+)", key)
    if m:
        return f"controlnet_down_blocks.{m.group(1)}.{m.group(2)}"
    m = re.fullmatch(r"middle_block_out\.0\.(.+)", key)
    if m:
        return f"controlnet_mid_block.{m.group(1)}"
    # whole UNet only
    m = re.fullmatch(rf"output_blocks\.(\d+)\.0\.{_LDM_RES}\.(.+)", key)
    if m:
        level, j = divmod(int(m.group(1)), lpb + 1)
        return f"up_blocks.{level}.resnets.{j}.{_RESNET_TO_DIFFUSERS[m.group(2)]}.{m.group(3)}"
    m = re.fullmatch(r"output_blocks\.(\d+)\.[12]\.conv\.(.+)", key)
    if m:
        return f"up_blocks.{int(m.group(1)) // (lpb + 1)}.upsamplers.0.conv.{m.group(2)}"
    m = re.fullmatch(r"output_blocks\.(\d+)\.1\.(.+)", key)
    if m:
        level, j = divmod(int(m.group(1)), lpb + 1)
        return f"up_blocks.{level}.attentions.{j}.{m.group(2)}"
    m = re.fullmatch(r"out\.0\.(.+)", key)
    if m:
        return f"conv_norm_out.{m.group(1)}"
    m = re.fullmatch(r"out\.2\.(.+)", key)
    if m:
        return f"conv_out.{m.group(1)}"
    return None


def _ldm_to_diffusers(state_dict: Mapping[str, T], what: str) -> dict[str, T]:
    keys = list(state_dict)
    lpb = _layers_per_block_ldm(keys)
    hint_out = _hint_conv_out_index(keys)
    out, unknown = {}, []
    for key, value in state_dict.items():
        new = _to_diffusers_key(key, lpb, hint_out)
        if new is None:
            unknown.append(key)
        else:
            out[new] = value
    if unknown:
        raise KeyMappingError(f"{len(unknown)} {what} weight name(s) have no diffusers equivalent, e.g. "
                              f"{', '.join(unknown[:3])}.")
    return out


# ---------------------------------------------------------------------------------------------- public API
def ldm_to_diffusers(state_dict: Mapping[str, T]) -> dict[str, T]:
    """ControlNet weights, ldm names (with or without `control_model.`) -> diffusers ControlNetModel names."""
    return _ldm_to_diffusers(strip_prefix(state_dict, LDM_CONTROL_PREFIX), "ControlNet")


def diffusers_to_ldm(state_dict: Mapping[str, T], prefix: str = "") -> dict[str, T]:
    """ControlNet weights, diffusers names -> ldm names; `prefix="control_model."` gives the released layout."""
    return {prefix + k: v for k, v in _diffusers_to_ldm(state_dict, "ControlNet").items()}


def unet_ldm_to_diffusers(state_dict: Mapping[str, T]) -> dict[str, T]:
    """Whole UNet, ldm/sgm UNetModel names (with or without `model.diffusion_model.`) -> UNet2DConditionModel."""
    return _ldm_to_diffusers(strip_prefix(state_dict, LDM_UNET_PREFIX), "UNet")


def unet_diffusers_to_ldm(state_dict: Mapping[str, T], prefix: str = "") -> dict[str, T]:
    """Whole UNet, UNet2DConditionModel names -> ldm/sgm UNetModel names (load_state_dict into the WebUI's UNet)."""
    return {prefix + k: v for k, v in _diffusers_to_ldm(state_dict, "UNet").items()}
