"""One ControlNet forward pass that takes a precomputed hint embedding and, for SDXL, the ready `y` vector.

Written by hand because diffusers' `ControlNetModel.forward` recomputes the hint embedding on every call (it
does not depend on the timestep, so that is wasted work each step) and only accepts SDXL's added conditions as
`text_embeds` + `time_ids`, while the WebUI's UNet hands over the already concatenated `y`. The layers used
are diffusers' own modules; only their order is repeated here.
"""
from __future__ import annotations

from typing import Optional

import torch


def hint_embedding(model, hint: torch.Tensor) -> torch.Tensor:
    """The ControlNet's image-side embedding of `hint` (N, 3, H, W) in [0, 1]; independent of the timestep."""
    if model.config.controlnet_conditioning_channel_order == "bgr":
        hint = torch.flip(hint, dims=[1])
    if getattr(model.config, "conditioning_channels", 3) == 1 and hint.shape[1] == 3:  # gray-input ControlNets
        hint = (hint * torch.tensor(_LUMA, dtype=hint.dtype, device=hint.device).view(1, 3, 1, 1)).sum(1, keepdim=True)
    return model.controlnet_cond_embedding(hint.to(device=model.device, dtype=model.dtype))


def added_embedding_input(model, text_embeds: torch.Tensor, time_ids: torch.Tensor) -> torch.Tensor:
    """SDXL: the vector `y` (pooled text + Fourier-embedded size/crop numbers) that the sgm UNet receives."""
    time_embeds = model.add_time_proj(time_ids.flatten()).reshape((text_embeds.shape[0], -1))
    return torch.cat([text_embeds, time_embeds.to(text_embeds.dtype)], dim=-1)


def controlnet_residuals(model, sample: torch.Tensor, timestep, context: torch.Tensor, embedded_hint: torch.Tensor,
                         y: Optional[torch.Tensor] = None) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Unscaled residuals (one per UNet input block, then the middle block) for a batch of rows.

    `embedded_hint` must already match the rows of `sample` (broadcasting a single image is fine).
    """
    h = model.conv_in(sample) + embedded_hint
    return encoder_residuals(model, h, time_embedding(model, sample, timestep, y), context)


def time_embedding(model, sample: torch.Tensor, timestep, y: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The time embedding of a batch of rows, plus SDXL's added embedding of `y`."""
    config = model.config
    if getattr(model, "class_embedding", None) is not None:
        raise NotImplementedError("ControlNets with class embeddings are not supported")
    timesteps = timestep
    if not torch.is_tensor(timesteps):
        timesteps = torch.tensor([timesteps], dtype=torch.float32, device=sample.device)
    elif timesteps.ndim == 0:
        timesteps = timesteps[None].to(sample.device)
    timesteps = timesteps.expand(sample.shape[0])
    emb = model.time_embedding(model.time_proj(timesteps).to(dtype=sample.dtype))
    if config.addition_embed_type == "text_time":
        if y is None:
            raise ValueError("this ControlNet is for SDXL and needs the added conditions (y)")
        emb = emb + model.add_embedding(y.to(emb.dtype))
    elif config.addition_embed_type is not None:
        raise NotImplementedError(f"addition_embed_type {config.addition_embed_type!r} is not supported")
    return emb


def encoder_residuals(model, h: torch.Tensor, emb: torch.Tensor,
                      context: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
    """From the conditioned input `h` (conv_in(sample) + the hint's part) through the encoder to the residuals."""
    config = model.config
    skips = [h]
    for block in model.down_blocks:
        if getattr(block, "has_cross_attention", False):
            h, res = block(hidden_states=h, temb=emb, encoder_hidden_states=context)
        else:
            h, res = block(hidden_states=h, temb=emb)
        skips.extend(res)
    if getattr(model.mid_block, "has_cross_attention", False):
        h = model.mid_block(h, emb, encoder_hidden_states=context)
    else:
        h = model.mid_block(h, emb)
    down = [zero_conv(skip) for skip, zero_conv in zip(skips, model.controlnet_down_blocks)]
    mid = model.controlnet_mid_block(h)
    if config.global_pool_conditions:
        down = [d.mean(dim=(2, 3), keepdim=True) for d in down]
        mid = mid.mean(dim=(2, 3), keepdim=True)
    return down, mid


# ITU-R 601 luma, as PIL's convert("L") that diffusers' adapter pipelines use for one-channel adapters.
_LUMA = (0.299, 0.587, 0.114)


def adapter_features(model, hint: torch.Tensor) -> list[torch.Tensor]:
    """A T2I-Adapter's feature maps for `hint` (N, 3, H, W) in [0, 1]; independent of the timestep and the
    prompt, so computed once per job. One-channel adapters (sketch, canny) get the hint's luma."""
    hint = hint.to(device=model.device, dtype=model.dtype)
    if model.config.in_channels == 1 and hint.shape[1] == 3:
        weights = torch.tensor(_LUMA, device=hint.device, dtype=hint.dtype).view(1, 3, 1, 1)
        hint = (hint * weights).sum(dim=1, keepdim=True)
    return list(model(hint))
