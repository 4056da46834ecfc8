"""Load any supported ControlNet file or folder into diffusers' ControlNetModel, without the hub.

The model is built on the meta device (accelerate's `init_empty_weights`: no memory, no random init) and the
file's tensors are assigned to it as they are, so loading costs one read of the file and no extra copy.
"""
from __future__ import annotations

from pathlib import Path

import torch

from lib_controlnet.models.configs import clean_config
from lib_controlnet.models.errors import ModelFileError
from lib_controlnet.models.formats import DIFFUSERS_FOLDER, FULL_CHECKPOINT, ModelInfo, inspect_model
from lib_controlnet.models.keymap import LDM_CONTROL_PREFIX, ldm_to_diffusers
from lib_controlnet.models.loading import read_tensors

DTYPES = {"fp16": torch.float16, "float16": torch.float16, "half": torch.float16, "fp32": torch.float32,
          "float32": torch.float32, "float": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}


def parse_dtype(dtype) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    try:
        return DTYPES[str(dtype).lower().replace("torch.", "")]
    except KeyError:
        raise ModelFileError(f"Unknown dtype {dtype!r}; use fp16, fp32 or bf16.") from None


def diffusers_state_dict(info: ModelInfo) -> dict[str, torch.Tensor]:
    """The file's ControlNet tensors under diffusers names."""
    tensors = read_tensors(info.weights_path)
    if info.format == FULL_CHECKPOINT:
        tensors = {k: v for k, v in tensors.items() if k.startswith(LDM_CONTROL_PREFIX)}
    if info.format in (DIFFUSERS_FOLDER, "diffusers (single file)"):
        return tensors
    return ldm_to_diffusers(tensors)


def _fit_projection_shapes(model: torch.nn.Module, state_dict: dict) -> None:
    """proj_in/out stored as 1x1 convs where the model wants linear layers (or the reverse): same numbers."""
    expected = {k: p.shape for k, p in model.state_dict(keep_vars=True).items()}
    for key, tensor in list(state_dict.items()):
        want = expected.get(key)
        if want is None or tuple(tensor.shape) == tuple(want) or ".proj_" not in key:
            continue
        if tensor.numel() == torch.Size(want).numel():
            state_dict[key] = tensor.reshape(want)


def assign_weights(model: torch.nn.Module, state_dict: dict, name: str, architecture: str) -> torch.nn.Module:
    """Put `state_dict` into `model` (built on the meta device) as it is, after checking that every tensor fits:
    a file that does not is named with the first keys that are missing, extra or of the wrong shape."""
    expected = model.state_dict(keep_vars=True)
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    wrong = [k for k in expected if k in state_dict and tuple(state_dict[k].shape) != tuple(expected[k].shape)]
    if missing or unexpected or wrong:
        details = "; ".join(part for part in (
            f"missing {', '.join(missing[:3])}" if missing else "",
            f"unexpected {', '.join(unexpected[:3])}" if unexpected else "",
            f"wrong shape {', '.join(wrong[:3])}" if wrong else "") if part)
        raise ModelFileError(f"{name} does not fit the {architecture} architecture it looks like ({details}).")
    model.load_state_dict(state_dict, strict=True, assign=True)
    return model.eval().requires_grad_(False)


def build_controlnet(config: dict, state_dict: dict, name: str = "The model"):
    """A ControlNetModel with exactly these weights (no random initialisation, no copy of the tensors)."""
    from accelerate import init_empty_weights
    from diffusers import ControlNetModel

    try:
        with init_empty_weights():
            model = ControlNetModel.from_config(clean_config(config))
    except (TypeError, ValueError, KeyError) as error:
        raise ModelFileError(f"{name} has a ControlNet config this version of diffusers cannot build: {error}.") from None
    _fit_projection_shapes(model, state_dict)
    return assign_weights(model, state_dict, name, "ControlNet")


def load_controlnet(path, dtype=None, device="cpu", info: ModelInfo | None = None):
    """Load a ControlNet file or diffusers folder. `dtype` None keeps the file's dtype."""
    info = info or inspect_model(Path(path))
    state_dict = diffusers_state_dict(info)
    model = build_controlnet(info.config, state_dict, info.path.name)
    dtype = parse_dtype(dtype)
    if dtype is not None or str(device) != "cpu":
        model = model.to(device=device, dtype=dtype)
    return model
