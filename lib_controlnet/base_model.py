"""The Stable Diffusion base model, loaded offline as a diffusers pipeline from a diffusers folder or a single-file
ldm checkpoint (with the configs and tokenizer the project ships). Shared by generation and training."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch

from lib_controlnet.errors import UserError
from lib_controlnet.settings import SHIPPED_CONFIGS_DIR

BASE_CONFIGS_DIR = SHIPPED_CONFIGS_DIR / "base"


class BaseModelError(UserError):
    """The base checkpoint cannot be used (missing, wrong kind, unsupported family)."""


def detect_family(keys_and_shapes: dict) -> str:
    """sd15 / sd2 / sdxl from an ldm checkpoint's keys (SD2's attention projections are linear)."""
    if any(k.startswith("conditioner.embedders.") for k in keys_and_shapes):
        return "sdxl"
    for key, shape in keys_and_shapes.items():
        if key.endswith("input_blocks.1.1.proj_in.weight"):
            return "sd2" if len(shape) == 2 else "sd15"
    raise BaseModelError("The base file holds no Stable Diffusion UNet (model.diffusion_model.*).")


def load_pipeline(path, config: Optional[str] = None, dtype=torch.float32):
    """A StableDiffusionPipeline from a diffusers folder or a single-file ldm checkpoint, offline."""
    from diffusers import StableDiffusionPipeline

    from lib_controlnet import tiny_models

    path = Path(path).expanduser()
    if not path.exists():
        raise BaseModelError(f"Base model {path} does not exist.")
    common = dict(safety_checker=None, requires_safety_checker=False, torch_dtype=dtype)
    if path.is_dir():
        if not (path / "model_index.json").exists():
            raise BaseModelError(f"{path} is a folder without model_index.json, so not a diffusers model.")
        return StableDiffusionPipeline.from_pretrained(str(path), local_files_only=True, **common)
    if config is None:
        from lib_controlnet.models.loading import read_header

        family = detect_family(read_header(path).shapes)
        if family == "sdxl":
            raise BaseModelError("SDXL single-file bases are not supported here yet; use SD1.5 or SD2, or a "
                                 "diffusers folder.")
        config = str(BASE_CONFIGS_DIR / family)
    if not (Path(config) / "tokenizer").is_dir():  # the shipped configs hold none: SD1/SD2 share CLIP's vocabulary
        common["tokenizer"] = tiny_models.tokenizer()
    try:
        return StableDiffusionPipeline.from_single_file(str(path), config=str(config), local_files_only=True,
                                                        **common)
    except (OSError, ValueError, RuntimeError, KeyError) as error:
        reason = str(error).strip().splitlines()[0][:200] if str(error).strip() else type(error).__name__
        raise BaseModelError(f"Could not load {path.name} with the config in {config} ({reason}); pass "
                             f"--base-config (base_config in a training config) with a diffusers config folder "
                             f"that matches it.") from None
