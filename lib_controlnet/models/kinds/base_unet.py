"""The loaded base UNet as kinds built on it see it: ldm names for its weights and modules, whichever host holds it.

Control-LoRA builds its ControlNet from the base's encoder weights; LLLite puts modules on the base's attention
layers. Both files name layers as the ldm/sgm UNetModel does (`input_blocks.4.1.transformer_blocks.0.attn1.to_q`),
so a diffusers `UNet2DConditionModel` (standalone generation) is read through the project's key map.
Nothing here writes to the UNet.
"""
from __future__ import annotations

import hashlib

import torch


def is_diffusers_unet(unet) -> bool:
    return hasattr(unet, "down_blocks") and not hasattr(unet, "input_blocks")


def _diffusers_to_ldm_names(unet) -> dict[str, str]:
    """{ldm weight name: diffusers weight name} for a diffusers UNet (names only; no tensor is touched)."""
    from lib_controlnet.models.keymap import unet_diffusers_to_ldm

    return unet_diffusers_to_ldm({name: name for name, _ in unet.named_parameters()})


def ldm_state(unet) -> dict[str, torch.Tensor]:
    """The base UNet's parameters under ldm names (the tensors themselves: callers must not change them)."""
    params = dict(unet.named_parameters())
    if is_diffusers_unet(unet):
        return {ldm: params[name] for ldm, name in _diffusers_to_ldm_names(unet).items()}
    return params


def ldm_modules(unet) -> dict[str, torch.nn.Module]:
    """{ldm module name: module} for the base UNet's layers that hold weights."""
    modules = dict(unet.named_modules())
    if not is_diffusers_unet(unet):
        return modules
    out = {}
    for ldm, name in _diffusers_to_ldm_names(unet).items():
        ldm_parts, parts = ldm.split(".")[:-1], name.split(".")[:-1]
        # the layer, then its parents as long as both spellings end alike (attn1, transformer_blocks.0, ...)
        while ldm_parts and parts:
            module = modules.get(".".join(parts))
            if module is not None:
                out.setdefault(".".join(ldm_parts), module)
            if ldm_parts[-1] != parts[-1]:
                break
            ldm_parts, parts = ldm_parts[:-1], parts[:-1]
    return out


def attention_heads(unet) -> dict[str, int]:
    """{ldm name of a transformer (input_blocks.N.1 / middle_block.1): heads of its attention}."""
    heads = {}
    for name, module in ldm_modules(unet).items():
        if name.endswith(".attn1") and hasattr(module, "heads"):
            owner = name.split(".transformer_blocks.")[0]
            heads.setdefault(owner, int(module.heads))
    return heads


def fingerprint(unet) -> tuple:
    """Which weights the base holds now: the WebUI loads another checkpoint into the same module objects, so the
    object's id is not enough. A few values of every parameter, gathered in one transfer, hashed."""
    with torch.no_grad():
        sample = torch.cat([p.detach().reshape(-1)[:8].float() for p in unet.parameters()])
    return id(unet), hashlib.sha1(sample.cpu().numpy().tobytes()).hexdigest()


def family(shapes: dict) -> str | None:
    """SDXL / SD1.5 / SD2.x from ldm-named shapes (a base's or a file's), None when they do not tell."""
    if any(k.startswith("label_emb.") for k in shapes):
        return "SDXL"
    width = next((s[1] for k, s in shapes.items() if k.endswith(("attn2.to_k.weight", "attn2.to_k.down"))), None)
    if width in (768, 1024, 2048):
        return {768: "SD1.5", 1024: "SD2.x", 2048: "SDXL"}[width]
    # other widths (small models): SD1.x projects into its transformers with 1x1 convolutions, SD2.x linearly
    proj = next((s for k, s in shapes.items() if k.endswith(("proj_in.weight", "proj_in.down"))), None)
    return None if proj is None else ("SD1.5" if len(proj) == 4 else "SD2.x")
