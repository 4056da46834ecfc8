"""ControlNet model files: detect, convert (ldm <-> diffusers), load, export, find by name, cache.

Public API (other parts of the extension import only from here):
  inspect_model(path) -> ModelInfo          format, base, dtype, n_params, fitted diffusers config
  load_controlnet(path, dtype, device)      -> diffusers ControlNetModel (no hub access)
  get_controlnet(name_or_path, ...)         the same through the registry and the LRU cache
  ldm_to_diffusers / diffusers_to_ldm       ControlNet key names
  unet_ldm_to_diffusers / unet_diffusers_to_ldm   whole-UNet key names
  save_controlnet_ldm / save_controlnet_diffusers
  get_registry() -> ModelRegistry (.refresh(), .names(), .find(name))
  load_control_model(path, dtype, device)   any kind (ControlNet, T2I-Adapter, ...), by the registry of kinds
  kind_of_file(path) / kind_of_model(model) -> Kind; KINDS: every kind (models/kinds/, one module each)
"""
from lib_controlnet.models.cache import get_cache, get_controlnet, resolve
from lib_controlnet.models.controlnet_loader import load_controlnet, parse_dtype
from lib_controlnet.models.errors import ModelFileError, ModelNotFoundError
from lib_controlnet.models.export import save_controlnet_diffusers, save_controlnet_ldm
from lib_controlnet.models.formats import ModelInfo, inspect_model
from lib_controlnet.models.kinds import KINDS, kind_of_file, kind_of_model, load_control_model
from lib_controlnet.models.loading import check_pickled_weights
from lib_controlnet.models.keymap import diffusers_to_ldm, ldm_to_diffusers, unet_diffusers_to_ldm, unet_ldm_to_diffusers
from lib_controlnet.models.registry import ModelRegistry, get_registry, legacy_short_hash

__all__ = [
    "ModelFileError", "ModelNotFoundError", "ModelInfo", "ModelRegistry", "inspect_model", "load_controlnet",
    "get_controlnet", "get_cache", "resolve", "parse_dtype", "ldm_to_diffusers", "diffusers_to_ldm",
    "unet_ldm_to_diffusers", "unet_diffusers_to_ldm", "save_controlnet_ldm", "save_controlnet_diffusers",
    "get_registry", "legacy_short_hash", "check_pickled_weights", "KINDS", "kind_of_file", "kind_of_model",
    "load_control_model",
]
