"""ControlNet control for diffusers' `UNet2DConditionModel` (standalone generation, training, tests).

One forward pre-hook (with kwargs) per job: it asks the Controller for the step's residuals and passes them as
`down_block_additional_residuals` / `mid_block_additional_residual`, the UNet's own ControlNet inputs, added
to any residuals the caller passed already; T2I-Adapter features go in as `down_intrablock_additional_residuals`,
the UNet's own adapter input (it adds them where diffusers' adapter pipelines do). ATTENTION kinds (LLLite)
hook the attention layers they condition, found under their ldm names. Reference units (lib_controlnet.reference)
add hooks on every transformer block's attn1 and on the modules whose outputs are the ldm UNet's block outputs,
so they act as on the WebUI's UNet. `forward` is never replaced, so other wrappers keep working.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch

from lib_controlnet.control import Controller, UNetCall
from lib_controlnet.models.kinds.base_unet import ldm_modules
from lib_controlnet.models.kinds import REFERENCE
from lib_controlnet.reference import ReferenceHooks, Removal, adain_layers, attention_weights, check_units

_POSITIONAL = ("sample", "timestep", "encoder_hidden_states")


def _argument(name: str, args: tuple, kwargs: dict):
    index = _POSITIONAL.index(name)
    if name in kwargs:
        return kwargs[name]
    return args[index] if len(args) > index else None


def _pre_hook(controller: Controller, state: dict, references=None):
    def hook(module, args, kwargs):
        state.clear()  # ATTENTION units' inputs for this call only
        added = kwargs.get("added_cond_kwargs") or {}
        call = UNetCall(
            sample=_argument("sample", args, kwargs),
            timestep=_argument("timestep", args, kwargs),
            context=_argument("encoder_hidden_states", args, kwargs),
            text_embeds=added.get("text_embeds"),
            time_ids=added.get("time_ids"),
        )
        if references is not None:
            passes, rows = controller.reference_passes(call)
            plain = {k: kwargs[k] for k in ("added_cond_kwargs", "timestep_cond", "cross_attention_kwargs")
                     if kwargs.get(k) is not None}
            references.run(passes, rows, lambda sample: module.forward(
                sample, call.timestep, encoder_hidden_states=call.context, return_dict=False, **plain))
        residuals = controller.residuals(call)
        if residuals is None:
            return None
        state.update(residuals.attention or {})
        kwargs = dict(kwargs)
        if residuals.down is not None:
            down, mid = residuals.down, residuals.mid
            if kwargs.get("down_block_additional_residuals") is not None:
                down = [ours + theirs for ours, theirs in zip(down, kwargs["down_block_additional_residuals"])]
            if kwargs.get("mid_block_additional_residual") is not None:
                mid = mid + kwargs["mid_block_additional_residual"]
            kwargs.update(down_block_additional_residuals=tuple(down), mid_block_additional_residual=mid)
        if residuals.encoder is not None:
            features = list(residuals.encoder)  # the UNet pops from this list
            if kwargs.get("down_intrablock_additional_residuals") is not None:
                theirs = kwargs["down_intrablock_additional_residuals"]
                features = [ours + other for ours, other in zip(features, theirs)]
            kwargs["down_intrablock_additional_residuals"] = features
        return args, kwargs

    return hook


@contextlib.contextmanager
def hooked(unet, controller: Controller) -> Iterator[Controller]:
    """Control `unet` with `controller` inside the block; the hook is gone afterwards, whatever happened."""
    controller.bind_base(unet)  # Control-LoRA: its ControlNet, built from this UNet's weights (cached)
    references = None
    if any(prepared.kind.control == REFERENCE for prepared in controller.units):
        references = reference_hooks(unet, controller)  # before any hook: a unit it cannot join is refused here
    expected = 1 + sum(len(b.resnets) + (1 if b.downsamplers else 0) for b in unet.down_blocks)  # conv_in + blocks
    from lib_controlnet.models.kinds import RESIDUALS

    for prepared in controller.units:
        if prepared.kind.control == RESIDUALS and prepared.n_residuals - 1 != expected:
            from lib_controlnet.control import ControlError

            raise ControlError(
                f"ControlNet '{prepared.unit.model}' gives {prepared.n_residuals} residuals but this UNet takes "
                f"{expected + 1}: it was made for another base model (SD1.5 / SD2 / SDXL).")
    state: dict = {}
    handles = [unet.register_forward_pre_hook(_pre_hook(controller, state, references), with_kwargs=True),
               unet.register_forward_hook(lambda module, args, output: state.clear())]
    try:
        # ATTENTION kinds (LLLite): pre-hooks on the attention layers, found by their ldm names
        handles.extend(controller.attach(lambda: ldm_modules(unet), lambda key: state.get(key)))
        if references is not None:
            references.install()
            handles.append(unet.register_forward_hook(lambda *_: references.reset()))  # records: one call's only
            handles.append(Removal(references))
        yield controller
    finally:
        for handle in handles:
            handle.remove()
        state.clear()
        controller.close()


def reference_hooks(unet, controller) -> ReferenceHooks:
    """Reference units' hook points: attn1 of every self-attending transformer block (in the ldm UNet's order:
    encoder, middle, decoder), and for AdaIN the module whose output is each ldm input / output block's output
    (the attention of a resnet + attention pair, else the resnet; a level's downsampler / upsampler)."""
    blocks = [m for part in (unet.down_blocks, [unet.mid_block], unet.up_blocks) for p in part for m in p.modules()
              if hasattr(m, "attn1") and hasattr(m, "norm1")]
    attention = [(block.attn1, weight) for block, weight in zip(blocks, attention_weights(blocks))
                 if not getattr(block, "only_cross_attention", False)]
    check_units(controller.units)
    encoder, decoder = {}, {}
    k = 0
    for block in unet.down_blocks:
        for j, resnet in enumerate(block.resnets):
            k += 1
            attentions = getattr(block, "attentions", None)
            encoder[k] = attentions[j] if attentions else resnet
        if block.downsamplers:
            k += 1
            encoder[k] = block.downsamplers[0]
    k = 0
    for block in unet.up_blocks:
        for j, resnet in enumerate(block.resnets):
            attentions = getattr(block, "attentions", None)
            decoder[k] = attentions[j] if attentions else resnet
            if j == len(block.resnets) - 1 and block.upsamplers:
                decoder[k] = block.upsamplers[0]
            k += 1
    adain = adain_layers(unet.mid_block, encoder, decoder, len(encoder) + 1)  # + conv_in, input block 0
    return ReferenceHooks(attention, adain, context_kwarg="encoder_hidden_states")


def vae_encoder(vae):
    """Images (N, 3, H, W) in [0, 1] -> scaled latents, for reference units: the distribution's mean, so the same
    job gives the same latent every time."""
    def encode(images):
        with torch.no_grad():
            latent = vae.encode(images.to(device=vae.device, dtype=vae.dtype) * 2 - 1).latent_dist.mean
        shift = getattr(vae.config, "shift_factor", None) or 0.0
        return (latent - shift) * vae.config.scaling_factor

    return encode
