"""Control-LoRA and ControlNet-LLLite files in the layouts users download, written from a tiny UNet, and each
kind's published definition written out independently of lib_controlnet (the references tests compare with)."""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

RANK = 4
ENCODER = ("time_embed.", "label_emb.", "input_blocks.", "middle_block.")
COND, MLP = 8, 8
# (ldm transformer, depth): kohya's depth is 1 / 2 / 3 for input blocks 1-2 / 4-5 / 7-8 and 3 for the middle block
TRANSFORMERS = [("input_blocks.4.1", 2), ("input_blocks.5.1", 2), ("input_blocks.7.1", 3), ("input_blocks.8.1", 3),
                ("middle_block.1", 3)]
PROJECTIONS = ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn2.to_q")
# the same transformers in diffusers' SDXL UNet
DIFFUSERS_NAMES = {"input_blocks.4.1": "down_blocks.1.attentions.0", "input_blocks.5.1": "down_blocks.1.attentions.1",
                   "input_blocks.7.1": "down_blocks.2.attentions.0", "input_blocks.8.1": "down_blocks.2.attentions.1",
                   "middle_block.1": "mid_block.attentions.0"}


def write_control_lora(path, base_ldm: dict, own: dict, seed: int = 7) -> dict:
    """Stability's layout, written out here: every encoder weight of 2+ dims as rank-RANK factors (up [out, r(,1,1)],
    down [r, in(, kh, kw)]) except label_emb.0.2.weight, given in full as trained tensors are; every bias and norm
    in full (perturbed, so they visibly replace the base's); the ControlNet's own layers; the marker."""
    generator = torch.Generator().manual_seed(seed)
    tensors = {"lora_controlnet": torch.tensor([])}
    for key, tensor in base_ldm.items():
        if not key.startswith(ENCODER):
            continue
        if key.endswith(".weight") and tensor.ndim >= 2 and key != "label_emb.0.2.weight":
            layer = key[:-len(".weight")]
            tail = (1, 1) if tensor.ndim == 4 else ()
            tensors[f"{layer}.up"] = torch.randn(tensor.shape[0], RANK, *tail, generator=generator) * 0.05
            tensors[f"{layer}.down"] = torch.randn(RANK, *tensor.shape[1:], generator=generator) * 0.05
        else:
            tensors[key] = tensor + torch.randn(tensor.shape, generator=generator) * 0.05
    tensors.update(own)
    save_file(tensors, str(path))
    return tensors


def reference_state(base_ldm: dict, file: dict) -> dict:
    """The published definition: weight = base + up.flatten(1) @ down.flatten(1), reshaped; the file's full tensors
    replace the base's."""
    out = {}
    for key, tensor in base_ldm.items():
        if not key.startswith(ENCODER):
            continue
        layer = key[:-len(".weight")]
        if f"{layer}.up" in file:
            up, down = file[f"{layer}.up"], file[f"{layer}.down"]
            out[key] = tensor + (up.flatten(1) @ down.flatten(1)).reshape(tensor.shape)
        else:
            out[key] = file.get(key, tensor)
    own = ("input_hint_block.", "zero_convs.", "middle_block_out.")
    out.update({k: v for k, v in file.items() if k.startswith(own)})
    return out


def conditioning_shapes(depth: int) -> list:
    """kohya's conditioning1 per depth: 3 -> COND/2 at 1/4, then to COND at 1/8 (1), 1/16 (2), 1/32 (3)."""
    half = COND // 2
    first = (half, 3, 4, 4)
    return {1: [first, (COND, half, 2, 2)], 2: [first, (COND, half, 4, 4)],
            3: [first, (half, half, 4, 4), (COND, half, 2, 2)]}[depth]


def write_lllite(path, unet, seed=3, names=None) -> dict:
    """`unet`: an ldm UNetModel, or a diffusers one with `names=DIFFUSERS_NAMES`."""
    generator = torch.Generator().manual_seed(seed)
    modules = dict(unet.named_modules())
    names = names or {}
    tensors = {}
    for transformer, depth in TRANSFORMERS:
        for projection in PROJECTIONS:
            layer = f"{transformer}.transformer_blocks.0.{projection}"
            width = modules[layer.replace(transformer, names.get(transformer, transformer))].in_features
            name = "lllite_unet_" + layer.replace(".", "_")
            for i, shape in enumerate(conditioning_shapes(depth)):
                tensors[f"{name}.conditioning1.{2 * i}.weight"] = torch.randn(shape, generator=generator) * 0.2
                tensors[f"{name}.conditioning1.{2 * i}.bias"] = torch.randn(shape[0], generator=generator) * 0.1
            for part, (out_f, in_f) in (("down", (MLP, width)), ("mid", (MLP, MLP + COND)), ("up", (width, MLP))):
                tensors[f"{name}.{part}.0.weight"] = torch.randn(out_f, in_f, generator=generator) * 0.3
                tensors[f"{name}.{part}.0.bias"] = torch.randn(out_f, generator=generator) * 0.1
    save_file(tensors, str(path))
    return tensors


class PublishedLLLite(torch.nn.Module):
    """The definition (kohya's description): x -> org(x + multiplier * up(relu(mid(cat([e, relu(down(x))]))))),
    e = conditioning1(2 * hint - 1) as (N, h*w, C) tokens, repeated to the batch."""

    def __init__(self, org, weights: dict, name: str, hint, multiplier: float):
        super().__init__()
        self.org, self.w, self.name, self.multiplier = org, weights, name, multiplier
        e = hint * 2 - 1
        convs = sorted({int(k.split(".")[-2]) for k in weights if k.startswith(f"{name}.conditioning1.")})
        for n, index in enumerate(convs):
            weight = weights[f"{name}.conditioning1.{index}.weight"]
            e = F.conv2d(e, weight, weights[f"{name}.conditioning1.{index}.bias"], stride=weight.shape[-1])
            if n < len(convs) - 1:
                e = F.relu(e)
        self.e = e.flatten(2).permute(0, 2, 1)

    def forward(self, x):
        w, n = self.w, self.name
        e = self.e.repeat(x.shape[0] // self.e.shape[0], 1, 1)
        h = torch.cat([e, F.relu(F.linear(x, w[f"{n}.down.0.weight"], w[f"{n}.down.0.bias"]))], dim=2)
        h = F.relu(F.linear(h, w[f"{n}.mid.0.weight"], w[f"{n}.mid.0.bias"]))
        h = F.linear(h, w[f"{n}.up.0.weight"], w[f"{n}.up.0.bias"])
        return self.org(x + h * self.multiplier)


def published(unet, weights, hint, multiplier, names=None):
    """A copy of `unet` whose conditioned layers are wrapped in the definition (diffusers UNet: `names`)."""
    reference = copy.deepcopy(unet)
    modules = dict(reference.named_modules())
    for transformer, _ in TRANSFORMERS:
        for projection in PROJECTIONS:
            layer = f"{transformer}.transformer_blocks.0.{projection}"
            parent, child = layer.replace(transformer, (names or {}).get(transformer, transformer)).rsplit(".", 1)
            name = "lllite_unet_" + layer.replace(".", "_")
            setattr(modules[parent], child, PublishedLLLite(getattr(modules[parent], child), weights, name, hint,
                                                            multiplier))
    return reference
