"""The WebUI's loaded checkpoint as the Train tab's base model.

VAE, text encoder and configs come from the checkpoint's file; the UNet weights come from the model the WebUI
holds in memory (through the ldm key mapping), so what is trained against is what the user generates with.
"""
from __future__ import annotations

from lib_controlnet.errors import UserError


def _loaded_model():
    from modules import shared

    model = getattr(shared, "sd_model", None)
    info = getattr(model, "sd_checkpoint_info", None)
    if model is None or info is None or not getattr(info, "filename", None):
        raise UserError("No checkpoint is loaded in the WebUI: load one, or untick \"the WebUI's loaded checkpoint\" "
                        "and give a base model path.")
    return model, info


def loaded_checkpoint_path() -> str:
    return str(_loaded_model()[1].filename)


def loaded_checkpoint_base(config):
    from lib_controlnet.train.base import load_base

    model, info = _loaded_model()
    # SD1/SD2 (ldm) and SDXL (sgm, with label_emb) UNets share the ldm key names the converter reads
    unet_weights = {k: v.detach().to("cpu") for k, v in model.model.diffusion_model.state_dict().items()}
    return load_base(info.filename, config.base_config, config.prediction_type, ldm_unet_state_dict=unet_weights)
