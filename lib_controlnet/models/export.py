"""Writing ControlNets: the ldm `control_model.*` safetensors every WebUI extension, ComfyUI and diffusers'
single-file loader read, or a diffusers folder. Files are written atomically (temporary name, then rename)."""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from lib_controlnet.models.controlnet_loader import parse_dtype
from lib_controlnet.models.errors import ModelFileError
from lib_controlnet.models.formats import CONFIG_METADATA_KEY
from lib_controlnet.models.keymap import LDM_CONTROL_PREFIX, diffusers_to_ldm


def _state_and_config(model_or_sd) -> tuple[dict[str, torch.Tensor], dict | None]:
    if isinstance(model_or_sd, torch.nn.Module):
        config = {k: v for k, v in dict(model_or_sd.config).items() if not k.startswith("_")}
        return model_or_sd.state_dict(), config
    return dict(model_or_sd), None


def _to_ldm_names(state_dict: dict) -> dict:
    if any(k.startswith("controlnet_cond_embedding.") for k in state_dict):
        return diffusers_to_ldm(state_dict, prefix=LDM_CONTROL_PREFIX)
    if any(k.startswith(LDM_CONTROL_PREFIX) for k in state_dict):
        return dict(state_dict)
    if any(k.startswith("input_hint_block.") for k in state_dict):
        return {LDM_CONTROL_PREFIX + k: v for k, v in state_dict.items()}
    raise ModelFileError("These weights are not a ControlNet (no conditioning embedding), so they cannot be exported.")


def save_controlnet_ldm(model_or_sd, path, dtype="fp16", metadata: dict | None = None) -> Path:
    """Write a ControlNet (diffusers model, or a state dict in diffusers or ldm names) as ldm safetensors.

    `metadata` values are stored as strings; the diffusers config is stored too when a model is given, so that
    this project reloads it with exactly the same architecture (attention heads cannot be read from weights).
    """
    from safetensors.torch import save_file

    path = Path(path)
    if path.suffix.lower() != ".safetensors":
        raise ModelFileError(f"{path.name}: an ldm ControlNet is written as a .safetensors file.")
    state_dict, config = _state_and_config(model_or_sd)
    target = parse_dtype(dtype)
    tensors = {k: (v.to(target) if target is not None and v.is_floating_point() else v).detach().cpu().contiguous()
               for k, v in _to_ldm_names(state_dict).items()}
    meta = {str(k): v if isinstance(v, str) else json.dumps(v) for k, v in (metadata or {}).items()}
    meta.setdefault("format", "pt")
    if config is not None:
        meta[CONFIG_METADATA_KEY] = json.dumps(config)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        save_file(tensors, str(tmp), metadata=meta)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def save_controlnet_diffusers(model, folder, dtype="fp16") -> Path:
    """Write a diffusers ControlNetModel folder (config.json + diffusion_pytorch_model.safetensors)."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise ModelFileError(f"{folder} exists and is not a folder; a diffusers ControlNet is written as a folder.")
    from safetensors.torch import save_file

    target = parse_dtype(dtype)
    # Cast copies of the tensors rather than the model: the caller's (maybe cached) model stays as it was.
    tensors = {k: (v.to(target) if target is not None and v.is_floating_point() else v).detach().cpu().contiguous()
               for k, v in model.state_dict().items()}
    folder.mkdir(parents=True, exist_ok=True)
    model.save_config(str(folder))
    tmp = folder / f".diffusion_pytorch_model.safetensors.tmp-{os.getpid()}"
    try:
        save_file(tensors, str(tmp), metadata={"format": "pt"})
        os.replace(tmp, folder / "diffusion_pytorch_model.safetensors")
    finally:
        tmp.unlink(missing_ok=True)
    return folder
