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


def open_clip_keys(text_encoder_2) -> dict:
    """A CLIPTextModelWithProjection's weights under OpenCLIP's names, as SDXL files store the bigG encoder
    (fused q/k/v `in_proj`, `resblocks`, `ln_final`, `text_projection` applied as x @ P)."""
    state = text_encoder_2.state_dict()
    out = {"token_embedding.weight": state["text_model.embeddings.token_embedding.weight"],
           "positional_embedding": state["text_model.embeddings.position_embedding.weight"],
           "ln_final.weight": state["text_model.final_layer_norm.weight"],
           "ln_final.bias": state["text_model.final_layer_norm.bias"],
           "text_projection": state["text_projection.weight"].T.contiguous()}
    for i in range(text_encoder_2.config.num_hidden_layers):
        hf, oc = f"text_model.encoder.layers.{i}.", f"transformer.resblocks.{i}."
        for part in ("weight", "bias"):
            out[oc + f"attn.in_proj_{part}"] = torch.cat([state[hf + f"self_attn.{p}_proj.{part}"] for p in "qkv"])
            out[oc + f"attn.out_proj.{part}"] = state[hf + f"self_attn.out_proj.{part}"]
            out[oc + f"ln_1.{part}"] = state[hf + f"layer_norm1.{part}"]
            out[oc + f"ln_2.{part}"] = state[hf + f"layer_norm2.{part}"]
            out[oc + f"mlp.c_fc.{part}"] = state[hf + f"mlp.fc1.{part}"]
            out[oc + f"mlp.c_proj.{part}"] = state[hf + f"mlp.fc2.{part}"]
    return out


def _ldm_vae(seed: int = 0) -> dict:
    from ldm.modules.diffusionmodules.model import Decoder, Encoder

    torch.manual_seed(seed)
    ddconfig = dict(ch=32, out_ch=3, ch_mult=(1, 1, 2, 2), num_res_blocks=1, attn_resolutions=[], in_channels=3,
                    resolution=128, z_channels=4, double_z=True)
    return {**{"encoder." + k: v for k, v in Encoder(**ddconfig).state_dict().items()},
            **{"decoder." + k: v for k, v in Decoder(**ddconfig).state_dict().items()},
            "quant_conv.weight": torch.randn(8, 8, 1, 1) * 0.1, "quant_conv.bias": torch.zeros(8),
            "post_quant_conv.weight": torch.randn(4, 4, 1, 1) * 0.1, "post_quant_conv.bias": torch.zeros(4)}


def sdxl_single_file_state(components: dict, v_pred: bool = False) -> dict:
    """A tiny SDXL base as the sgm single file users have: model.diffusion_model.*, conditioner.embedders.0
    (CLIP-L, transformers names), conditioner.embedders.1 (OpenCLIP bigG), first_stage_model.* (ldm VAE)."""
    from lib_controlnet.models import unet_diffusers_to_ldm

    state = unet_diffusers_to_ldm(components["unet"].state_dict(), prefix="model.diffusion_model.")
    state.update({"conditioner.embedders.0.transformer." + k: v
                  for k, v in components["text_encoder"].state_dict().items()})
    state.update({"conditioner.embedders.1.model." + k: v
                  for k, v in open_clip_keys(components["text_encoder_2"]).items()})
    state.update({"first_stage_model." + k: v for k, v in _ldm_vae().items()})
    if v_pred:
        state["v_pred"] = torch.tensor([])  # the empty marker tensor v-prediction fine-tunes carry
    return state


def write_tiny_sdxl_single_file(path: Path, seed: int = 0, dtype=torch.float32, v_pred: bool = False,
                                config_dir: Path | None = None, **unet_overrides) -> Path:
    """Save a tiny SDXL base as one sgm checkpoint; with `config_dir`, also its diffusers folder (the configs
    the file is loaded with, as the shipped SDXL folder is for full-size files)."""
    from diffusers import StableDiffusionXLPipeline
    from safetensors.torch import save_file

    from lib_controlnet import tiny_models

    components = tiny_models.tiny_sdxl_components(seed, **unet_overrides)
    if config_dir is not None:
        StableDiffusionXLPipeline(**components).save_pretrained(str(config_dir), safe_serialization=True)
    state = sdxl_single_file_state(components, v_pred)
    save_file({k: (v.to(dtype) if v.is_floating_point() else v).contiguous() for k, v in state.items()}, str(path))
    return path
