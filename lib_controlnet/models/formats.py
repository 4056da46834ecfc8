"""What a file or folder is: its layout (format), the base model it belongs to, its dtype and size.

Decided from key names and shapes only (the safetensors header, or a memory-mapped pickle), never by
running anything. Files of other control-model kinds (models/kinds: T2I-Adapter, Control-LoRA, ...) are named.
"""
from __future__ import annotations

import collections
import dataclasses
import json
import math
from pathlib import Path

import torch

from lib_controlnet.models import configs
from lib_controlnet.models.errors import ModelFileError
from lib_controlnet.models.keymap import LDM_CONTROL_PREFIX, LDM_UNET_PREFIX, ldm_to_diffusers
from lib_controlnet.models.loading import Header, read_header, weights_file_of
from lib_controlnet.models.sidecar import apply_overrides, sidecar_overrides

# Formats
LDM_PREFIXED = "ldm (control_model.*)"
LDM = "ldm (stripped)"
DIFFUSERS_FILE = "diffusers (single file)"
DIFFUSERS_FOLDER = "diffusers (folder)"
FULL_CHECKPOINT = "full checkpoint (model.diffusion_model.* + control_model.*)"

DTYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.float64: "fp64"}
# Written into the safetensors metadata by export.py: the diffusers config the weights were trained with.
CONFIG_METADATA_KEY = "controlnet_studio.config"


@dataclasses.dataclass
class ModelInfo:
    path: Path
    format: str
    base: str                     # configs.BASES key: sd15, sd2, sdxl, sdxl_mid, sdxl_small
    dtype: str                    # fp16 / fp32 / bf16 (the most common floating dtype)
    n_params: int
    config: dict                  # diffusers ControlNetModel config that fits the weights (may hold
                                  # fields other diffusers versions add; builders filter them)
    weights_path: Path            # the file holding the tensors (differs from path for folders)
    metadata: dict = dataclasses.field(default_factory=dict)

    @property
    def base_label(self) -> str:
        return configs.BASE_LABELS.get(self.base, self.base)

    def summary(self) -> dict:
        return {"path": str(self.path), "format": self.format, "base": self.base_label, "dtype": self.dtype,
                "parameters": self.n_params}


def classify_keys(keys: list[str], nested: tuple[str, ...] = (), name: str = "This file") -> str:
    """The format of a weights file, or a ModelFileError saying what it is instead."""
    from lib_controlnet.models.kinds import FileKeys, other_kind_of_keys  # kinds import this module

    other = other_kind_of_keys(FileKeys(Path(name), {k: () for k in keys}, nested))
    if other is not None:
        raise ModelFileError(f"{name} is a {other.name} model, not a plain ControlNet; this needs a ControlNet.")
    has_control = any(k.startswith(LDM_CONTROL_PREFIX) for k in keys)
    has_unet = any(k.startswith(LDM_UNET_PREFIX) for k in keys)
    if has_control:
        return FULL_CHECKPOINT if has_unet else LDM_PREFIXED
    if has_unet:
        raise ModelFileError(f"{name} is a Stable Diffusion checkpoint without ControlNet weights; put it in the "
                             "WebUI's models/Stable-diffusion folder, not among ControlNet models.")
    if any(k.startswith("input_hint_block.") for k in keys) and any(k.startswith("zero_convs.") for k in keys):
        return LDM
    if any(k.startswith("controlnet_cond_embedding.") for k in keys):
        return DIFFUSERS_FILE
    example = f" (its first key is {sorted(keys)[0]!r})" if keys else " (it holds no tensors)"
    raise ModelFileError(f"{name} is not a ControlNet: none of its weight names belong to a ControlNet{example}.")


def _dominant_dtype(dtypes, shapes) -> str:
    weight = collections.Counter()
    for key, dtype in dtypes.items():
        if dtype.is_floating_point:
            weight[dtype] += math.prod(shapes[key])
    if not weight:
        return "unknown"
    dtype = weight.most_common(1)[0][0]
    return DTYPE_NAMES.get(dtype, str(dtype).replace("torch.", ""))


def control_shapes(header: Header, fmt: str) -> dict[str, tuple[int, ...]]:
    """Shapes of the ControlNet part under diffusers names."""
    shapes = header.shapes
    if fmt == FULL_CHECKPOINT:
        shapes = {k: v for k, v in shapes.items() if k.startswith(LDM_CONTROL_PREFIX)}
    if fmt in (LDM_PREFIXED, LDM, FULL_CHECKPOINT):
        return ldm_to_diffusers(shapes)
    return dict(shapes)


def _read_folder_config(folder: Path) -> dict:
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        raise ModelFileError(f"The config.json of folder {folder.name} is not valid JSON.") from None
    if not isinstance(config, dict) or config.get("_class_name", "ControlNetModel") != "ControlNetModel":
        kind = config.get("_class_name") if isinstance(config, dict) else "unknown"
        raise ModelFileError(f"Folder {folder.name} holds a {kind}, not a ControlNetModel.")
    return config


def inspect_model(path) -> ModelInfo:
    """Detect format, base, dtype and parameter count of a ControlNet file or diffusers folder."""
    path = Path(path)
    if path.is_dir():
        weights = weights_file_of(path)
        header = read_header(weights)
        fmt = DIFFUSERS_FOLDER
        classify_keys(list(header.shapes), header.nested, f"The weights in folder {path.name}")
        folder_config = _read_folder_config(path)
    else:
        weights = path
        header = read_header(path)
        fmt = classify_keys(list(header.shapes), header.nested, path.name)
        folder_config = None
    shapes = control_shapes(header, fmt)
    base = configs.detect_base(shapes)
    stored = header.metadata.get(CONFIG_METADATA_KEY)
    if folder_config is not None:
        config = folder_config
    elif stored:
        try:
            config = json.loads(stored)
        except (json.JSONDecodeError, TypeError):
            config = apply_overrides(configs.config_for(shapes, base), sidecar_overrides(path))
    else:
        config = apply_overrides(configs.config_for(shapes, base), sidecar_overrides(path))
    kept = {k: v for k, v in header.shapes.items() if fmt != FULL_CHECKPOINT or k.startswith(LDM_CONTROL_PREFIX)}
    return ModelInfo(
        path=path, format=fmt, base=base,
        dtype=_dominant_dtype({k: header.dtypes[k] for k in kept}, kept),
        n_params=sum(math.prod(s) for s in kept.values()),
        config=config, weights_path=weights,
        metadata={k: v for k, v in header.metadata.items() if k != CONFIG_METADATA_KEY},
    )
