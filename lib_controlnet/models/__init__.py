"""ControlNet model files: detect, convert (ldm <-> diffusers), load, export, find by name, cache."""
from lib_controlnet.models.controlnet_loader import load_controlnet
from lib_controlnet.models.errors import ModelFileError, ModelNotFoundError
from lib_controlnet.models.formats import ModelInfo, inspect_model
from lib_controlnet.models.keymap import diffusers_to_ldm, ldm_to_diffusers, unet_diffusers_to_ldm, unet_ldm_to_diffusers

__all__ = [
    "ModelFileError", "ModelNotFoundError", "ModelInfo", "inspect_model", "load_controlnet",
    "ldm_to_diffusers", "diffusers_to_ldm", "unet_ldm_to_diffusers", "unet_diffusers_to_ldm",
]
