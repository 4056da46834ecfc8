"""A tiny single-file SD1.5-style checkpoint (ldm keys) made from a tiny diffusers base folder."""
from __future__ import annotations

from pathlib import Path

import torch


def write_tiny_single_file(base_folder: Path, path: Path):
    """The base as one ldm checkpoint: UNet via our converter, CLIP under cond_stage_model.transformer, and a VAE
    built by the WebUI's own ldm Encoder/Decoder (random weights). Returns the diffusers pipeline it came from."""
    from diffusers import StableDiffusionPipeline
    from ldm.modules.diffusionmodules.model import Decoder, Encoder
    from safetensors.torch import save_file

    from lib_controlnet.models import unet_diffusers_to_ldm

    folder = StableDiffusionPipeline.from_pretrained(base_folder, local_files_only=True)
    state = unet_diffusers_to_ldm(folder.unet.state_dict(), prefix="model.diffusion_model.")
    state.update({"cond_stage_model.transformer." + k: v for k, v in folder.text_encoder.state_dict().items()})
    torch.manual_seed(0)
    ddconfig = dict(ch=32, out_ch=3, ch_mult=(1, 1, 2, 2), num_res_blocks=1, attn_resolutions=[], in_channels=3,
                    resolution=128, z_channels=4, double_z=True)
    vae = {**{"encoder." + k: v for k, v in Encoder(**ddconfig).state_dict().items()},
           **{"decoder." + k: v for k, v in Decoder(**ddconfig).state_dict().items()},
           "quant_conv.weight": torch.randn(8, 8, 1, 1) * 0.1, "quant_conv.bias": torch.zeros(8),
           "post_quant_conv.weight": torch.randn(4, 4, 1, 1) * 0.1, "post_quant_conv.bias": torch.zeros(4)}
    state.update({"first_stage_model." + k: v for k, v in vae.items()})
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return folder
