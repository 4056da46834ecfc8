"""A VAE from a single file, as users have them: ldm keys (`encoder.down.0.block.0...`, as sdxl_vae.safetensors,
sdxl.vae.safetensors of sdxl-vae-fp16-fix or vae-ft-mse-840000; also under `first_stage_model.`) or diffusers keys
(`encoder.down_blocks.0.resnets.0...`, a diffusers VAE folder's weights file, with old or new attention names).

It replaces the base's VAE and takes that VAE's config (so its scaling factor). A VAE the user gives is taken as
safe in half precision (the reason to give one for SDXL is sdxl-vae-fp16-fix): its `force_upcast` is off, so
training may run it in fp16 and SDXL pipelines decode in fp16. The stock SDXL VAE keeps `force_upcast` and fp32.

A file of another kind (a full checkpoint, a UNet, a ControlNet, a truncated file) gets one sentence. SD1.x and
SDXL VAEs have the same layout and shapes, so a VAE of the other family cannot be told from its file.
"""
from __future__ import annotations

from pathlib import Path

import torch

from lib_controlnet.errors import UserError

LDM_PREFIXES = ("first_stage_model.", "vae.")
LDM_MARKER = "encoder.down.0.block.0.conv1.weight"
DIFFUSERS_MARKER = "encoder.down_blocks.0.resnets.0.conv1.weight"
# diffusers' attention names before 0.14 (older VAE files still carry them) -> today's
OLD_ATTENTION_NAMES = {".query.": ".to_q.", ".key.": ".to_k.", ".value.": ".to_v.", ".proj_attn.": ".to_out.0."}
NOT_A_VAE = (  # (key prefixes or markers, what the file is)
    (("model.diffusion_model.",), "a full Stable Diffusion checkpoint (it holds a UNet)"),
    (("input_blocks.", "down_blocks.0.attentions.", "time_embedding.", "time_embed."), "a UNet"),
    (("control_model.", "controlnet_cond_embedding.", "input_hint_block."), "a ControlNet"),
    (("cond_stage_model.", "conditioner.", "text_model."), "a text encoder"),
)


class VaeFileError(UserError):
    """The VAE file cannot replace the base's VAE; the message is one sentence naming the file."""


def _advice(name: str) -> str:
    return (f"give a VAE file (such as sdxl_vae.safetensors or sdxl.vae.safetensors from sdxl-vae-fp16-fix) "
            f"instead of {name}")


def _diffusers_state(tensors: dict, config: dict, name: str) -> dict:
    """The file's tensors under diffusers' AutoencoderKL names."""
    for prefix in LDM_PREFIXES:
        if any(k.startswith(prefix + "encoder.") for k in tensors):
            tensors = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
            break
    if LDM_MARKER in tensors:
        from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

        return convert_ldm_vae_checkpoint(tensors, config)
    if DIFFUSERS_MARKER in tensors:
        state = {}
        for key, value in tensors.items():
            for old, new in OLD_ATTENTION_NAMES.items():
                key = key.replace(old, new) if ".attentions." in key else key
            state[key] = value
        return state
    for prefixes, what in NOT_A_VAE:
        if any(k.startswith(prefixes) for k in tensors):
            raise VaeFileError(f"{name} is {what}, not a VAE; {_advice('it')}.")
    raise VaeFileError(f"{name} holds no VAE weights (no encoder.down.* or encoder.down_blocks.* keys); "
                       f"{_advice('it')}.")


def load_vae_file(path, like) -> torch.nn.Module:
    """The VAE in `path` as an AutoencoderKL with the config of `like` (the base's VAE), in float32, fp16-safe."""
    from diffusers import AutoencoderKL

    from lib_controlnet.models.errors import ModelFileError
    from lib_controlnet.models.loading import read_tensors

    path = Path(path).expanduser()
    if not path.is_file():
        raise VaeFileError(f"VAE file {path} does not exist{' (it is a folder)' if path.is_dir() else ''}.")
    try:
        tensors = read_tensors(path)
    except ModelFileError as error:
        raise VaeFileError(str(error)) from None
    for prefixes, what in NOT_A_VAE[:1]:  # a full checkpoint also holds first_stage_model.*: still not a VAE file
        if any(k.startswith(prefixes) for k in tensors):
            raise VaeFileError(f"{path.name} is {what}, not a VAE; {_advice('it')}.")
    config = dict(like.config)
    state = _diffusers_state(tensors, config, path.name)
    vae = AutoencoderKL.from_config({**config, "force_upcast": False})
    expected = vae.state_dict()
    missing = [k for k in expected if k not in state]
    if missing:
        raise VaeFileError(f"{path.name} does not fit this base model's VAE ({len(missing)} of its "
                           f"{len(expected)} weights are missing, e.g. {missing[0]}).")
    wrong = [k for k in expected if tuple(state[k].shape) != tuple(expected[k].shape)]
    if wrong:
        raise VaeFileError(f"{path.name} does not fit this base model's VAE ({wrong[0]} has shape "
                           f"{tuple(state[wrong[0]].shape)}, the base's {tuple(expected[wrong[0]].shape)}).")
    vae.load_state_dict({k: state[k].to(torch.float32) for k in expected})
    vae.requires_grad_(False)
    return vae.eval()


__all__ = ["VaeFileError", "load_vae_file"]
