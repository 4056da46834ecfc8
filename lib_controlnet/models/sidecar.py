"""Settings that weights cannot carry, read from files next to them.

lllyasviel's releases ship a `<stem>.yaml` (cldm config) beside each `.pth`; its `control_stage_config`
says whether the ControlNet pools its output (`global_average_pooling`, the shuffle model) and how many
attention heads it uses. A `<stem>.json` beside a file may hold a diffusers ControlNetModel config.
"""
from __future__ import annotations

import json
from pathlib import Path


def _yaml_overrides(path: Path) -> dict:
    import yaml

    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
        params = data["model"]["params"]["control_stage_config"]["params"]
    except (OSError, UnicodeDecodeError, yaml.YAMLError, KeyError, TypeError):
        return {}  # not a cldm config: ignore it rather than refuse the model
    overrides = {}
    if "global_average_pooling" in params:
        overrides["global_pool_conditions"] = bool(params["global_average_pooling"])
    heads, head_channels = params.get("num_heads", -1), params.get("num_head_channels", -1)
    if isinstance(head_channels, int) and head_channels > 0:
        overrides["_head_channels"] = head_channels
    elif isinstance(heads, int) and heads > 0:
        overrides["attention_head_dim"] = heads
    return overrides


def sidecar_overrides(weights: Path) -> dict:
    """Config fields from `<stem>.json` (diffusers config) or `<stem>.yaml` (cldm config) next to the file."""
    as_json = weights.with_suffix(".json")
    if as_json.is_file():
        try:
            data = json.loads(as_json.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            data = None
        if isinstance(data, dict) and data.get("_class_name", "ControlNetModel") == "ControlNetModel":
            return data
    for suffix in (".yaml", ".yml"):
        if weights.with_suffix(suffix).is_file():
            return _yaml_overrides(weights.with_suffix(suffix))
    if "shuffle" in weights.stem.lower():
        # control_v11e_sd15_shuffle pools its residuals; without its yaml, its name is the only hint we have.
        return {"global_pool_conditions": True}
    return {}


def apply_overrides(config: dict, overrides: dict) -> dict:
    config = dict(config)
    head_channels = overrides.get("_head_channels")
    config.update({k: v for k, v in overrides.items() if not k.startswith("_")})
    if head_channels:
        config["attention_head_dim"] = [max(1, c // head_channels) for c in config["block_out_channels"]]
    return config
