"""T2I-Adapter (TencentARC; SD1.x full and light, SDXL full): features added to the encoder's features.

Files come in two layouts, both loaded into diffusers' `T2IAdapter`:
- diffusers (`adapter.conv_in.weight`, `adapter.body.{level}.resnets.{j}.block1.weight`, ... ; single file or a
  folder with config.json), as TencentARC publishes its SDXL adapters;
- TencentARC's original `t2iadapter_*_sd14v1.pth` layout: full `conv_in.weight` + a flat `body.{k}` list of
  resnet blocks (k = level * blocks_per_level + j, `in_conv` where the channel count changes); light
  `body.{level}.in_conv` / `body.{level}.body.{j}` / `body.{level}.out_conv`. The style model
  (`style_embedding` + a transformer) is a kind of its own: kinds/t2i_style.py.
A full adapter is for SDXL when its pixel-unshuffled input has 256 or 768 channels (1 or 3 colour channels at
downscale 16), as other loaders decide.
"""
from __future__ import annotations

import re
from pathlib import Path

import torch

from lib_controlnet.models.errors import ModelFileError
from lib_controlnet.models.kinds.base import ENCODER_FEATURES, FileKeys, Kind
from lib_controlnet.models.loading import read_tensors

SDXL_INPUT_CHANNELS = (256, 768)
_FLAT_BLOCK = re.compile(r"^body\.(\d+)\.(in_conv|block1|block2|skep)\.(weight|bias)$")
_LIGHT_BLOCK = re.compile(r"^body\.(\d+)\.body\.(\d+)\.(block1|block2)\.(weight|bias)$")


def _layout(keys: FileKeys) -> str | None:
    if (keys.folder_config or {}).get("_class_name") == "T2IAdapter":
        return "diffusers folder"
    if keys.has("adapter.body.0.resnets.0.block1.weight") or keys.has("adapter.conv_in.weight"):
        return "diffusers"
    if keys.has("body.0.in_conv.weight") and keys.has("body.0.out_conv.weight"):
        return "light"
    if keys.has("conv_in.weight") and keys.any_startswith("body.0.block1."):
        return "full"
    return None


def _levels(indices) -> int:
    return max(indices) + 1 if indices else 0


def diffusers_config(keys: FileKeys) -> dict:
    """The T2IAdapter config that fits a file's keys and shapes (any layout but folders)."""
    layout, shapes = _layout(keys), keys.shapes
    if layout == "diffusers":
        if "adapter.body.0.out_conv.weight" in shapes:  # light
            levels = _levels([int(m.group(1)) for k in shapes if (m := re.match(r"adapter\.body\.(\d+)\.out_conv", k))])
            resnets = {int(m.group(1)) for k in shapes if (m := re.match(r"adapter\.body\.0\.resnets\.(\d+)\.", k))}
            return dict(in_channels=shapes["adapter.body.0.in_conv.weight"][1] // 64,
                        channels=[shapes[f"adapter.body.{i}.out_conv.weight"][0] for i in range(levels - 1)],
                        num_res_blocks=len(resnets), downscale_factor=8, adapter_type="light_adapter")
        levels = _levels([int(m.group(1)) for k in shapes if (m := re.match(r"adapter\.body\.(\d+)\.resnets", k))])
        resnets = {int(m.group(1)) for k in shapes if (m := re.match(r"adapter\.body\.0\.resnets\.(\d+)\.", k))}
        unshuffled = shapes["adapter.conv_in.weight"][1]
        xl = unshuffled in SDXL_INPUT_CHANNELS
        return dict(in_channels=unshuffled // (256 if xl else 64),
                    channels=[shapes[f"adapter.body.{i}.resnets.0.block1.weight"][0] for i in range(levels)],
                    num_res_blocks=len(resnets), downscale_factor=16 if xl else 8,
                    adapter_type="full_adapter_xl" if xl else "full_adapter")
    if layout == "light":
        levels = _levels([int(m.group(1)) for k in shapes if (m := re.match(r"body\.(\d+)\.out_conv", k))])
        blocks = {int(m.group(2)) for k in shapes if (m := _LIGHT_BLOCK.match(k)) and m.group(1) == "0"}
        return dict(in_channels=shapes["body.0.in_conv.weight"][1] // 64,
                    channels=[shapes[f"body.{i}.out_conv.weight"][0] for i in range(levels - 1)],
                    num_res_blocks=len(blocks), downscale_factor=8, adapter_type="light_adapter")
    if layout == "full":
        blocks = sorted({int(m.group(1)) for k in shapes if (m := _FLAT_BLOCK.match(k))})
        if any(k.endswith(("skep.weight", "down_opt.op.weight")) for k in shapes):
            raise ModelFileError(f"{keys.path.name} is a T2I-Adapter variant (skip convolutions or convolutional "
                                 "downsampling) that this version cannot run.")
        # Every released full adapter has 4 levels; blocks whose width changes (and so hold an in_conv) must
        # start a level. Otherwise the first in_conv after block 0 marks where level 1 starts.
        starts = [k for k in blocks if k > 0 and f"body.{k}.in_conv.weight" in shapes]
        per_level = len(blocks) // 4 if len(blocks) % 4 == 0 else 0
        if not per_level or any(k % per_level for k in starts):
            per_level = starts[0] if starts else 0
        if not per_level or len(blocks) % per_level or any(k % per_level for k in starts):
            raise ModelFileError(f"{keys.path.name} looks like a T2I-Adapter but its blocks do not form levels.")
        unshuffled = shapes["conv_in.weight"][1]
        xl = unshuffled in SDXL_INPUT_CHANNELS
        return dict(in_channels=unshuffled // (256 if xl else 64),
                    channels=[shapes[f"body.{i * per_level}.block1.weight"][0]
                              for i in range(len(blocks) // per_level)],
                    num_res_blocks=per_level, downscale_factor=16 if xl else 8,
                    adapter_type="full_adapter_xl" if xl else "full_adapter")
    raise ModelFileError(f"{keys.path.name} is not a T2I-Adapter layout this version knows.")


def to_diffusers_keys(tensors: dict[str, torch.Tensor], config: dict) -> dict[str, torch.Tensor]:
    """TencentARC's original names -> diffusers' T2IAdapter names (diffusers names pass through)."""
    if any(k.startswith("adapter.") for k in tensors):
        return dict(tensors)
    out = {}
    per_level = config["num_res_blocks"]
    for key, tensor in tensors.items():
        if key == "conv_in.weight" or key == "conv_in.bias":
            out[f"adapter.{key}"] = tensor
        elif m := _LIGHT_BLOCK.match(key):
            out[f"adapter.body.{m.group(1)}.resnets.{m.group(2)}.{m.group(3)}.{m.group(4)}"] = tensor
        elif m := re.match(r"^body\.(\d+)\.(in_conv|out_conv)\.(weight|bias)$", key):
            if config["adapter_type"] == "light_adapter":
                out[f"adapter.{key}"] = tensor
            else:  # full: the flat block k = level * per_level (the level's first) holds the in_conv
                out[f"adapter.body.{int(m.group(1)) // per_level}.in_conv.{m.group(3)}"] = tensor
        elif m := _FLAT_BLOCK.match(key):
            k = int(m.group(1))
            out[f"adapter.body.{k // per_level}.resnets.{k % per_level}.{m.group(2)}.{m.group(3)}"] = tensor
        else:
            out[key] = tensor  # left for the strict load below to name
    return out


def build_adapter(config: dict, state_dict: dict, name: str):
    from accelerate import init_empty_weights
    from diffusers import T2IAdapter

    allowed = ("in_channels", "channels", "num_res_blocks", "downscale_factor", "adapter_type")
    try:
        with init_empty_weights():
            model = T2IAdapter(**{k: v for k, v in config.items() if k in allowed})
    except (TypeError, ValueError) as error:
        raise ModelFileError(f"{name} has a T2I-Adapter config this version of diffusers cannot build: "
                             f"{error}.") from None
    from lib_controlnet.models.controlnet_loader import assign_weights

    return assign_weights(model, state_dict, name, "T2I-Adapter")


class T2IAdapterKind(Kind):
    name = "T2I-Adapter"
    control = ENCODER_FEATURES

    def recognises(self, keys: FileKeys) -> bool:
        return _layout(keys) is not None

    def load(self, path: Path, keys: FileKeys, dtype=None, device="cpu"):
        path = Path(path)
        if keys.folder_config is not None:
            config = dict(keys.folder_config)
        else:
            config = diffusers_config(keys)
        tensors = to_diffusers_keys(read_tensors(keys.weights_path), config)
        model = build_adapter(config, tensors, path.name)
        from lib_controlnet.models.controlnet_loader import parse_dtype

        dtype = parse_dtype(dtype)
        if dtype is not None or str(device) != "cpu":
            model = model.to(device=device, dtype=dtype)
        return model

    def n_outputs(self, model) -> int:
        return len(model.adapter.body)  # one feature map per adapter block

    def owns(self, model) -> bool:
        from diffusers import T2IAdapter

        return isinstance(model, T2IAdapter)


T2I_ADAPTER = T2IAdapterKind()
