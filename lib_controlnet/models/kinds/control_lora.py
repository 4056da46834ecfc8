"""Control-LoRA (Stability AI's control-lora canny / depth / recolor / sketch, ranks 128 and 256; SDXL): a
ControlNet stored as low-rank deltas to the base UNet's encoder plus the ControlNet's own layers.

The file's layout (ldm ControlNet names without `control_model.`, as ComfyUI's loader reads them):
- `lora_controlnet`: a marker tensor;
- `<layer>.up` [out, rank(, 1, 1)] and `<layer>.down` [rank, in(, kh, kw)] for encoder layers the ControlNet copies
  from the UNet: the ControlNet's `<layer>.weight` is the base UNet's plus up @ down;
- full tensors for the rest it holds: the ControlNet's own layers (input_hint_block, zero_convs, middle_block_out)
  and whatever encoder tensors were trained in full (biases, norms, label_emb, ...), which replace the base's.
Every other encoder tensor is the base UNet's. So the runnable ControlNet exists only for a given base: `load`
reads and checks the file (a `ControlLoraWeights`), `for_base` builds a plain diffusers ControlNetModel from the
loaded base in memory, cached by (base weights, file). The base UNet is only read, never changed.
"""
from __future__ import annotations

import collections
import math
import re
from pathlib import Path

import torch

from lib_controlnet.models.errors import ModelFileError
from lib_controlnet.models.kinds import base_unet
from lib_controlnet.models.kinds.base import RESIDUALS, FileKeys, Kind
from lib_controlnet.models.loading import read_tensors
from lib_controlnet.models.lru import ModelLru

MARKER = "lora_controlnet"
_LORA = re.compile(r"^(.+)\.(up|down)$")
OWN_LAYERS = ("input_hint_block.", "zero_convs.", "middle_block_out.")
ENCODER = ("time_embed.", "label_emb.", "input_blocks.", "middle_block.")  # what a ControlNet copies from a UNet
REQUIRED = ("input_hint_block.0.weight", "zero_convs.0.0.weight", "middle_block_out.0.weight")


class ControlLoraWeights:
    """A checked Control-LoRA file, not yet a model: `ControlLoraKind.for_base` makes one for a base UNet."""

    def __init__(self, path: Path, loras: dict, full: dict, file_key: tuple):
        self.path, self.loras, self.full, self.file_key = path, loras, full, file_key

    @property
    def n_residuals(self) -> int:
        return len({k.split(".")[1] for k in self.full if k.startswith("zero_convs.")}) + 1

    def to(self, *args, **kwargs) -> "ControlLoraWeights":
        return self  # its tensors are read only when merged, on the base's device, into the job's dtype

    def modules(self):
        return iter(())  # no layers until merged (what per-model kernel choices look for)

    def shapes(self) -> dict:
        out = {k: tuple(v.shape) for k, v in self.full.items()}
        out.update({f"{layer}.down": tuple(down.shape) for layer, (_, down) in self.loras.items()})
        return out


def _split(name: str, tensors: dict) -> tuple[dict, dict]:
    """(layer: (up, down), full tensors), or the sentence saying what is wrong with the file."""
    loras, full, halves = {}, {}, collections.defaultdict(dict)
    for key, tensor in tensors.items():
        if key == MARKER:
            continue
        match = _LORA.match(key)
        if match:
            halves[match.group(1)][match.group(2)] = tensor
        elif key.startswith(OWN_LAYERS + ENCODER):
            full[key] = tensor
        else:
            raise ModelFileError(f"{name} holds weights a Control-LoRA does not have (such as {key}), so it is not a "
                                 "Control-LoRA file this version can run.")
    for layer, pair in sorted(halves.items()):
        if set(pair) != {"up", "down"}:
            has, lacks = ("up", "down") if "up" in pair else ("down", "up")
            raise ModelFileError(f"{name} is a damaged Control-LoRA file: layer {layer} has its '{has}' factor but "
                                 f"not its '{lacks}' factor.")
        up, down = pair["up"], pair["down"]
        if up.ndim < 2 or down.ndim < 2 or up.shape[1] != down.shape[0]:
            raise ModelFileError(f"{name} is a damaged Control-LoRA file: the LoRA factors of layer {layer} do not "
                                 f"fit together ({tuple(up.shape)} and {tuple(down.shape)}).")
        loras[layer] = (up, down)
    missing = [k for k in REQUIRED if k not in full]
    if missing:
        raise ModelFileError(f"{name} is a Control-LoRA file without the ControlNet's own layers (no {missing[0]}), "
                             "so it is damaged or incomplete.")
    return loras, full


# merged ControlNets by (base fingerprint, file, dtype, device); as many as the model cache holds
MERGED = ModelLru()


def _wrong_base(weights: ControlLoraWeights, base_shapes: dict, detail: str) -> ModelFileError:
    made_for = base_unet.family(weights.shapes())
    loaded = base_unet.family(base_shapes)
    return ModelFileError(
        f"{weights.path.name} is a Control-LoRA {'for ' + made_for if made_for else 'for another base model'} and "
        f"does not fit the loaded {loaded or 'base'} model ({detail}); load the checkpoint it was made for.")


def merged_state(weights: ControlLoraWeights, base: dict, dtype=None, device=None) -> dict[str, torch.Tensor]:
    """The ControlNet's ldm-named tensors: base encoder + up @ down, the file's full tensors, its own layers.
    Every tensor is a new one (`copy=True`), so nothing done to the ControlNet can reach the base."""
    shapes = {k: tuple(v.shape) for k, v in base.items()}
    state = {}
    for key, tensor in base.items():
        if key.startswith(ENCODER):
            state[key] = tensor
    for key, tensor in weights.full.items():
        if key.startswith(ENCODER) and (key not in state or tuple(state[key].shape) != tuple(tensor.shape)):
            raise _wrong_base(weights, shapes, f"{key} {'differs' if key in state else 'is not in its UNet'}")
    for layer, (up, down) in weights.loras.items():
        target = state.get(f"{layer}.weight")
        if target is None or target.shape[0] != up.shape[0] or target[0].numel() != math.prod(down.shape[1:]):
            raise _wrong_base(weights, shapes, f"{layer} {'differs' if target is not None else 'is not in its UNet'}")
    out = {}
    for key, tensor in state.items():
        source = weights.full.get(key, tensor)
        target_device = device if device is not None else tensor.device
        target_dtype = dtype if dtype is not None else tensor.dtype
        lora = weights.loras.get(key[:-len(".weight")]) if key.endswith(".weight") else None
        if lora is None:
            out[key] = source.to(device=target_device, dtype=target_dtype, copy=True)
            continue
        # computed in fp32 on the base's device (fast where the base sits on the GPU), then cast once
        up, down = (t.to(device=tensor.device, dtype=torch.float32) for t in lora)
        merged = source.to(torch.float32) + (up.flatten(1) @ down.flatten(1)).reshape(source.shape)
        out[key] = merged.to(device=target_device, dtype=target_dtype)
    for key, tensor in weights.full.items():
        if key.startswith(OWN_LAYERS):
            out[key] = tensor.to(device=device if device is not None else tensor.device,
                                 dtype=dtype if dtype is not None else tensor.dtype, copy=True)
    return out


def build_for_base(weights: ControlLoraWeights, unet, dtype=None, device=None):
    """A diffusers ControlNetModel holding the merged weights, for this base UNet."""
    from lib_controlnet.models import configs
    from lib_controlnet.models.controlnet_loader import build_controlnet
    from lib_controlnet.models.keymap import ldm_to_diffusers

    with torch.no_grad():
        state = ldm_to_diffusers(merged_state(weights, base_unet.ldm_state(unet), dtype, device))
        config = configs.config_for({k: tuple(v.shape) for k, v in state.items()})
        # Head counts do not show in weight shapes: the ControlNet uses the base's own, level by level.
        heads = base_unet.attention_heads(unet)
        per_level = config["layers_per_block"] + 1
        levels = len(config["block_out_channels"])
        by_level = [next((h for name, h in heads.items() if name.startswith("input_blocks.")
                          and (int(name.split(".")[1]) - 1) // per_level == level), None) for level in range(levels)]
        if any(h is not None for h in by_level):
            fallback = heads.get("middle_block.1") or next(h for h in by_level if h is not None)
            by_level[-1] = by_level[-1] or fallback  # diffusers takes the middle block's heads from the last level
            config["attention_head_dim"] = [h or fallback for h in by_level]
        # SDXL's size/crop embedding width does not show either; a diffusers base says it (the WebUI's passes y).
        time_dim = (getattr(unet, "config", None) or {}).get("addition_time_embed_dim")
        if time_dim and config.get("addition_embed_type") == "text_time":
            config["addition_time_embed_dim"] = time_dim
        return build_controlnet(config, state, weights.path.name)


class ControlLoraKind(Kind):
    name = "Control-LoRA"
    control = RESIDUALS

    def recognises(self, keys: FileKeys) -> bool:
        return keys.has(MARKER) or any(_LORA.match(k) for k in keys.shapes)

    def load(self, path: Path, keys: FileKeys, dtype=None, device="cpu"):
        path = Path(path)
        loras, full = _split(path.name, read_tensors(keys.weights_path))
        stat = keys.weights_path.stat()
        return ControlLoraWeights(path, loras, full, (str(keys.weights_path.resolve()), stat.st_mtime_ns, stat.st_size))

    def made_for(self, keys: FileKeys) -> str | None:
        shapes = {k: v for k, v in keys.shapes.items() if k != MARKER}
        return {"SDXL": "sdxl", "SD2.x": "sd2", "SD1.5": "sd15"}.get(base_unet.family(shapes))

    def n_outputs(self, model) -> int:
        return model.n_residuals

    def owns(self, model) -> bool:
        return isinstance(model, ControlLoraWeights)

    def for_base(self, model, unet, dtype=None, device=None):
        key = (base_unet.fingerprint(unet), model.file_key, str(dtype), str(device))
        return MERGED.get(key, lambda: build_for_base(model, unet, dtype, device))


CONTROL_LORA = ControlLoraKind()
