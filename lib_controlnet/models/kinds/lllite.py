"""ControlNet-LLLite (kohya-ss, SDXL): small modules that condition the inputs of attention's q/k/v projections
on the hint.

Layout of a file (one module per conditioned projection; which projections a file conditions is its own choice,
as released: attn1's to_q/to_k/to_v and attn2's to_q in the encoder's and middle block's transformers):
    lllite_unet_<ldm module name with "." as "_">.conditioning1.{0,2[,4]}.{weight,bias}   hint -> embedding
    ....down.0.{weight,bias}   Linear(in, mlp)                 (Conv2d 1x1 for convolution targets)
    ....mid.0.{weight,bias}    Linear(mlp + cond_emb, mlp)
    ....up.0.{weight,bias}     Linear(mlp, in)
`conditioning1` is a stack of strided convolutions (kernel = stride, ReLU between) taking the hint in [-1, 1] down
to the resolution of the layer's tokens: 3 -> cond_emb/2 at 1/4, then to cond_emb at 1/8, 1/16 or 1/32.
With e = conditioning1(2 * hint - 1) as tokens, a module changes its projection's input x to
    x + weight * up(relu(mid(cat([e, relu(down(x))], channels))))
and the projection runs as usual on that. Here each module is a forward pre-hook on its projection layer; the
embedding is computed once per job and size. The unit's weight is the multiplier (LLLite has no per-depth outputs
for "My prompt is more important" to soften, so that mode is Balanced); "ControlNet is more important" acts on the
conditional rows only; a mask limits where the modules act, resized to each layer's grid.
"""
from __future__ import annotations

import collections
import re
from pathlib import Path

import torch
import torch.nn.functional as F

from lib_controlnet.hook_handles import removed_on_error
from lib_controlnet.models.errors import ModelFileError
from lib_controlnet.models.kinds.base import ATTENTION, FileKeys, Kind
from lib_controlnet.models.loading import read_tensors

PREFIX = "lllite_unet_"
_KEY = re.compile(r"^(lllite_unet_\w+?)\.(conditioning1\.\d+|down\.0|mid\.0|up\.0)\.(weight|bias)$")


class LLLiteModule(torch.nn.Module):
    """One module, shaped from its file's tensors."""

    def __init__(self, shapes: dict[str, tuple]):
        super().__init__()
        convs = sorted(int(k.split(".")[1]) for k in shapes if k.startswith("conditioning1.") and k.endswith("weight"))
        layers: list[torch.nn.Module] = []
        for index in convs:
            out_c, in_c, kernel, _ = shapes[f"conditioning1.{index}.weight"]
            while len(layers) < index:  # the ReLUs between the convolutions
                layers.append(torch.nn.ReLU())
            layers.append(torch.nn.Conv2d(in_c, out_c, kernel_size=kernel, stride=kernel))
        self.conditioning1 = torch.nn.Sequential(*layers)
        down = shapes["down.0.weight"]
        self.is_conv = len(down) == 4

        def layer(shape):
            if self.is_conv:
                return torch.nn.Conv2d(shape[1], shape[0], kernel_size=1)
            return torch.nn.Linear(shape[1], shape[0])

        self.down = torch.nn.Sequential(layer(down), torch.nn.ReLU())
        self.mid = torch.nn.Sequential(layer(shapes["mid.0.weight"]), torch.nn.ReLU())
        self.up = torch.nn.Sequential(layer(shapes["up.0.weight"]))

    def embed(self, hint: torch.Tensor) -> torch.Tensor:
        """(N, C, h, w) conditioning embedding of a hint in [0, 1]."""
        return self.conditioning1(hint * 2.0 - 1.0)

    def delta(self, x: torch.Tensor, embedding: torch.Tensor) -> torch.Tensor:
        """What the module adds to its projection's input x, for embeddings already matched to x's rows."""
        if self.is_conv:
            if embedding.shape[-2:] != x.shape[-2:]:
                embedding = F.interpolate(embedding, size=x.shape[-2:], mode="bilinear", align_corners=False)
            joined = torch.cat([embedding, self.down(x)], dim=1)
        else:
            joined = torch.cat([_tokens(embedding, x.shape[1]), self.down(x)], dim=2)
        return self.up(self.mid(joined))


def _tokens(embedding: torch.Tensor, n_tokens: int) -> torch.Tensor:
    """(N, C, h, w) -> (N, h*w, C). The strided embedding lands on the layer's grid whenever the UNet itself can
    run the size (a multiple of 32 pixels for SDXL); a guard resizes it to the nearest grid otherwise."""
    n, c, h, w = embedding.shape
    if h * w != n_tokens:
        # the UNet halves sizes rounding up: take the grid with n_tokens cells nearest in shape
        want = h * (n_tokens / (h * w)) ** 0.5
        divisors = [a for a in range(1, int(n_tokens ** 0.5) + 1) if n_tokens % a == 0]
        height = min(divisors + [n_tokens // a for a in divisors], key=lambda a: abs(a - want))
        grid = (height, n_tokens // height)
        embedding = F.interpolate(embedding, size=grid, mode="bilinear", align_corners=False)
        h, w = grid
    return embedding.reshape(n, c, h * w).permute(0, 2, 1)


class LLLiteModel(torch.nn.Module):
    """All modules of one file, by the ldm name of the layer each conditions."""

    def __init__(self, groups: dict[str, dict[str, tuple]], file_name: str = "The ControlNet-LLLite model"):
        super().__init__()
        self.file_name = file_name
        self.targets = sorted(groups)
        self.blocks = torch.nn.ModuleList([LLLiteModule(groups[target]) for target in self.targets])

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype


def _groups(name: str, shapes: dict) -> dict[str, dict[str, tuple]]:
    """{ldm layer name: {tensor name inside the module: shape}}, or the sentence saying what is wrong."""
    groups: dict = collections.defaultdict(dict)
    for key, shape in shapes.items():
        match = _KEY.match(key)
        if not match:
            raise ModelFileError(f"{name} holds a weight a ControlNet-LLLite file does not have ({key}), so it is "
                                 "not a ControlNet-LLLite file this version can run.")
        groups[match.group(1)][f"{match.group(2)}.{match.group(3)}"] = tuple(shape)
    if not groups:
        raise ModelFileError(f"{name} holds no ControlNet-LLLite modules.")
    for module, tensors in groups.items():
        wanted = ("conditioning1.0.weight", "down.0.weight", "mid.0.weight", "up.0.weight")
        missing = [t for t in wanted if t not in tensors] + [t.replace("weight", "bias") for t in wanted
                                                            if t.replace("weight", "bias") not in tensors]
        if missing:
            raise ModelFileError(f"{name} is a damaged ControlNet-LLLite file: module {module} has no {missing[0]}.")
        down, mid, up = tensors["down.0.weight"], tensors["mid.0.weight"], tensors["up.0.weight"]
        convs = sorted(int(k.split(".")[1]) for k in tensors if k.startswith("conditioning1.") and k.endswith("weight"))
        chain = [tensors[f"conditioning1.{i}.weight"] for i in convs]
        emb = chain[-1][0]
        if (any(len(s) != 4 or s[2] != s[3] for s in chain) or chain[0][1] != 3
                or any(a[0] != b[1] for a, b in zip(chain, chain[1:])) or len({len(down), len(mid), len(up)}) != 1
                or len(down) not in (2, 4) or mid[1] != down[0] + emb or up[1] != mid[0] or up[0] != down[1]):
            raise ModelFileError(f"{name} is a damaged ControlNet-LLLite file: the layers of module {module} do not "
                                 "fit together.")
    # lllite_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q: the ldm name with "." written as "_";
    # matched against the UNet's own names when attached (the spelling alone is ambiguous: "to_q", "attn1").
    return dict(groups)


def _hook(module: LLLiteModule, current):
    def hook(layer, args):
        call = current()
        if call is None:
            return None
        x = args[0]
        every_row = isinstance(call.selection, slice) and call.selection == slice(None)
        rows = x if every_row else x[call.selection]
        embedding = call.embeddings[module]
        if embedding.shape[0] == 1:
            embedding = embedding.expand(len(call.images), *embedding.shape[1:])
        else:
            embedding = embedding[torch.tensor(call.images, device=embedding.device)]
        delta = module.delta(rows.to(embedding.dtype), embedding).to(x.dtype) * call.scale
        if call.mask is not None:
            mask = call.mask.to(device=delta.device, dtype=delta.dtype)
            mask = mask.expand(len(call.images), *mask.shape[1:]) if mask.shape[0] == 1 else mask[call.images]
            delta = delta * (F.interpolate(mask, size=delta.shape[-2:], mode="area") if module.is_conv
                             else _tokens(mask, delta.shape[1]))
        if every_row:
            return (x + delta, *args[1:])
        out = x.clone()
        out[call.selection] += delta
        return (out, *args[1:])

    return hook


class LLLiteKind(Kind):
    name = "ControlNet-LLLite"
    control = ATTENTION

    def recognises(self, keys: FileKeys) -> bool:
        return keys.any_contains("lllite")

    def load(self, path: Path, keys: FileKeys, dtype=None, device="cpu"):
        from lib_controlnet.models.controlnet_loader import assign_weights, parse_dtype

        path = Path(path)
        groups = _groups(path.name, keys.shapes)
        with torch.device("meta"):
            model = LLLiteModel(groups, path.name)
        tensors = read_tensors(keys.weights_path)
        state = {}
        for index, target in enumerate(model.targets):
            for inner in groups[target]:
                state[f"blocks.{index}.{inner}"] = tensors[f"{target}.{inner}"]
        model = assign_weights(model, state, path.name, "ControlNet-LLLite")
        dtype = parse_dtype(dtype)
        if dtype is not None or str(device) != "cpu":
            model = model.to(device=device, dtype=dtype)
        return model

    def made_for(self, keys: FileKeys) -> str | None:
        return "sdxl"  # kohya-ss's LLLite exists for SDXL only (its training script and every released file)

    def n_outputs(self, model) -> int:
        return len(model.blocks)

    def owns(self, model) -> bool:
        return isinstance(model, LLLiteModel)

    def embed(self, model, hint):
        hint = hint.to(device=model.device, dtype=model.dtype)
        return {module: module.embed(hint) for module in model.blocks}

    def attach(self, model, modules: dict, current) -> list:
        by_spelling = {PREFIX + name.replace(".", "_"): layer for name, layer in modules.items()}

        def misfit(detail: str) -> ModelFileError:
            return ModelFileError(f"{model.file_name} is a ControlNet-LLLite model made for another base model than "
                                  f"the loaded one ({detail}); ControlNet-LLLite models are for SDXL.")

        missing = [t for t in model.targets if t not in by_spelling]
        if missing:
            raise misfit(f"its UNet has no layer {missing[0][len(PREFIX):]}")
        handles = []
        with removed_on_error(handles):
            for target, module in zip(model.targets, model.blocks):
                layer = by_spelling[target]
                want = layer.in_features if isinstance(layer, torch.nn.Linear) else getattr(layer, "in_channels", None)
                if want != module.up[0].weight.shape[0]:
                    raise misfit(f"its layer {target[len(PREFIX):]} takes {want} channels, the module gives "
                                 f"{module.up[0].weight.shape[0]}")
                handles.append(layer.register_forward_pre_hook(_hook(module, current)))
        return handles


LLLITE = LLLiteKind()
