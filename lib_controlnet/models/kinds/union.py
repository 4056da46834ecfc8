"""ControlNet-Union and ProMax (xinsir's controlnet-union-sdxl-1.0): one SDXL ControlNet for many control types.

The file is a diffusers ControlNet plus a few parts (names as released, single file or folder alike):
- `task_embedding` [N, C]: one learned vector per control type (N = 6 union, 8 ProMax: 0 OpenPose, 1 Depth,
  2 Soft Edge (HED/PiDi/scribble/TEED), 3 Hard Edge (canny/lineart/MLSD), 4 Normal Map, 5 Segmentation, 6 Tile,
  7 Inpaint);
- `control_add_embedding.linear_{1,2}`: the one-hot of the types in use, Fourier-embedded like SDXL's size numbers
  and added to the time embedding;
- `transformer_layes.{i}` (sic) + `spatial_ch_projs`: a small transformer over one token per condition (its
  embedding's mean plus its type vector) and one for the sample, whose outputs shift each condition's embedding
  before they are summed onto the sample.
Several conditions go through one forward (the design's point), so units sharing one union model combine.
Files load into `ControlNetUnion`, diffusers' ControlNetModel plus those parts; `union_residuals` runs it.
"""
from __future__ import annotations

import re
from pathlib import Path

import torch
from torch import nn

from lib_controlnet.models.errors import ModelFileError
from lib_controlnet.models.kinds.base import RESIDUALS, FileKeys, Kind
from lib_controlnet.models.loading import read_tensors

from lib_controlnet.unit import UnionControlType

# The control types a union model knows, by task index (ControlNetPlus' order); names as the other WebUI
# extension's `union_control_type` takes them.
UNION_TYPES = tuple(t.value for t in UnionControlType if t is not UnionControlType.UNKNOWN)
# The panel's control types (preprocess.CONTROL_TYPES) that each union type stands for.
PANEL_TYPES = {"OpenPose": ("OpenPose",), "Depth": ("Depth",), "Soft Edge": ("SoftEdge", "Scribble"),
               "Hard Edge": ("Canny", "Lineart", "MLSD"), "Normal Map": ("NormalMap",),
               "Segmentation": ("Segmentation",), "Tile": ("Tile",), "Inpaint": ("Inpaint",)}
_UNION_OF_PANEL = {panel: union for union, panels in PANEL_TYPES.items() for panel in panels}
_UNION_PREFIXES = ("task_embedding", "transformer_layes.", "spatial_ch_projs.", "control_add_embedding.")
# What the weights cannot tell: the condition transformer's heads (8 in every released union model).
DEFAULT_HEADS = 8


def is_union(keys: FileKeys) -> bool:
    return (keys.any_contains("control_add_embedding.linear_1.bias") and keys.any_contains("task_embedding")) or (
        (keys.folder_config or {}).get("_class_name") == "ControlNetUnionModel")


def union_type_of_panel_type(control_type: str) -> str | None:
    """The union type a panel control type ("Canny", "SoftEdge", ...) maps to; None where none fits."""
    return _UNION_OF_PANEL.get(control_type)


# ---------------------------------------------------------------------------------------------------- model
class _QuickGELU(nn.Module):
    def forward(self, x):
        return x * torch.sigmoid(1.702 * x)


class _Mlp(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.c_fc, self.gelu, self.c_proj = nn.Linear(width, width * 4), _QuickGELU(), nn.Linear(width * 4, width)

    def forward(self, x):
        return self.c_proj(self.gelu(self.c_fc(x)))


class _ConditionBlock(nn.Module):
    """Pre-norm self-attention + MLP over the condition tokens (CLIP-style, as the released files hold it)."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.attn = nn.MultiheadAttention(width, heads)
        self.ln_1, self.mlp, self.ln_2 = nn.LayerNorm(width), _Mlp(width), nn.LayerNorm(width)

    def forward(self, x):
        # x is (rows, tokens, C) but the attention is sequence-first, as in ControlNetPlus and diffusers: it mixes
        # each token slot across the call's rows. Kept so outputs equal the released code's.
        y = self.ln_1(x)
        x = x + self.attn(y, y, y, need_weights=False)[0]
        return x + self.mlp(self.ln_2(x))


def _controlnet_class():
    from diffusers import ControlNetModel

    class ControlNetUnion(ControlNetModel):
        """diffusers' ControlNetModel with the union parts added by `add_union_parts` (built on meta, then filled)."""

        def add_union_parts(self, n_types: int, width: int, heads: int, layers: int, proj: int, time_dim: int):
            from diffusers.models.embeddings import TimestepEmbedding, Timesteps

            self.union_config = dict(num_control_type=n_types, num_trans_channel=width, num_trans_head=heads,
                                     num_trans_layer=layers, num_proj_channel=proj, addition_time_embed_dim=time_dim)
            time_embed_dim = self.config.block_out_channels[0] * 4
            self.task_embedding = nn.Parameter(torch.empty(n_types, width))
            self.transformer_layes = nn.ModuleList([_ConditionBlock(width, heads) for _ in range(layers)])
            self.spatial_ch_projs = nn.Linear(width, proj)
            self.control_type_proj = Timesteps(time_dim, self.config.flip_sin_to_cos, self.config.freq_shift)
            self.control_add_embedding = TimestepEmbedding(time_dim * n_types, time_embed_dim)

        @property
        def n_control_types(self) -> int:
            return self.task_embedding.shape[0]

    return ControlNetUnion


_CLASS = None


def union_class():
    global _CLASS
    if _CLASS is None:  # built on first use: diffusers is imported late, as the other kinds do
        _CLASS = _controlnet_class()
    return _CLASS


def _union_params(keys: FileKeys, shapes: dict, config: dict) -> dict:
    """The union parts' sizes: from the folder's config where given, else from the tensors' shapes."""
    layers = {int(m.group(1)) for k in shapes if (m := re.match(r"transformer_layes\.(\d+)\.", k))}
    try:
        n_types, width = shapes["task_embedding"]
        time_dim = shapes["control_add_embedding.linear_1.weight"][1] // n_types
        proj = shapes["spatial_ch_projs.weight"][0]
    except (KeyError, ValueError, ZeroDivisionError):
        raise ModelFileError(f"{keys.path.name} looks like a ControlNet-Union model but its union parts "
                             "(task_embedding, control_add_embedding, spatial_ch_projs) are incomplete.") from None
    return dict(n_types=n_types, width=width, heads=int(config.get("num_trans_head") or DEFAULT_HEADS),
                layers=len(layers), proj=proj, time_dim=time_dim)


def load_union(path: Path, keys: FileKeys, dtype=None, device="cpu"):
    from accelerate import init_empty_weights

    from lib_controlnet.models import configs
    from lib_controlnet.models.controlnet_loader import _fit_projection_shapes, assign_weights, parse_dtype

    path = Path(path)
    tensors = read_tensors(keys.weights_path)
    shapes = {k: tuple(v.shape) for k, v in tensors.items()}
    plain = {k: v for k, v in shapes.items() if not k.startswith(_UNION_PREFIXES)}
    if keys.folder_config is not None:
        config = dict(keys.folder_config)
    else:  # a single file as xinsir publishes it (diffusers names): the architecture from the shapes
        try:
            config = configs.config_for(plain, configs.detect_base(plain))
        except ModelFileError as error:
            raise ModelFileError(f"{path.name} looks like a ControlNet-Union model but its ControlNet part is not "
                                 f"complete ({str(error).rstrip('.')}).") from None
    params = _union_params(keys, shapes, config)
    # SDXL's size numbers and the union's type one-hot share one Fourier width, which the union part tells
    config["addition_time_embed_dim"] = params["time_dim"]
    if config.get("addition_embed_type") != "text_time":
        raise ModelFileError(f"{path.name} is a ControlNet-Union model without SDXL's added embeddings; only "
                             "the SDXL union models (xinsir's union and ProMax) are supported.")
    try:
        with init_empty_weights():
            model = union_class().from_config(configs.clean_config(config))
            model.add_union_parts(**params)
    except (TypeError, ValueError, KeyError) as error:
        raise ModelFileError(f"{path.name} has a ControlNet-Union config this version cannot build: {error}.") from None
    _fit_projection_shapes(model, tensors)
    model = assign_weights(model, tensors, path.name, "ControlNet-Union")
    dtype = parse_dtype(dtype)
    if dtype is not None or str(device) != "cpu":
        model = model.to(device=device, dtype=dtype)
    return model


# -------------------------------------------------------------------------------------------------- forward
def union_residuals(model, sample: torch.Tensor, timestep, context: torch.Tensor, conditions: list[torch.Tensor],
                    type_indices: list[int], y=None) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Unscaled residuals for several conditions in one forward. `conditions` are the hint embeddings
    (`control_forward.hint_embedding`, timestep-independent, so computed once per job), one per control type in
    `type_indices`, each matching the rows of `sample`."""
    from lib_controlnet.control_forward import encoder_residuals, time_embedding

    rows = sample.shape[0]
    emb = time_embedding(model, sample, timestep, y)
    one_hot = torch.zeros(rows, model.n_control_types, device=sample.device)
    one_hot[:, list(type_indices)] = 1
    type_embeds = model.control_type_proj(one_hot.flatten()).reshape(rows, -1).to(emb.dtype)
    emb = emb + model.control_add_embedding(type_embeds)

    h = model.conv_in(sample)
    tokens = [condition.mean(dim=(2, 3)) + model.task_embedding[index]
              for condition, index in zip(conditions, type_indices)]
    tokens = torch.stack(tokens + [h.mean(dim=(2, 3))], dim=1)
    for layer in model.transformer_layes:
        tokens = layer(tokens)
    fused = torch.zeros_like(h)
    for slot, condition in enumerate(conditions):
        fused = fused + condition + model.spatial_ch_projs(tokens[:, slot])[:, :, None, None]
    return encoder_residuals(model, h + fused, emb, context)


# ----------------------------------------------------------------------------------------------------- kind
class UnionKind(Kind):
    name = "ControlNet-Union"
    control = RESIDUALS

    def recognises(self, keys: FileKeys) -> bool:
        return is_union(keys)

    def load(self, path: Path, keys: FileKeys, dtype=None, device="cpu"):
        return load_union(path, keys, dtype=dtype, device=device)

    def n_outputs(self, model) -> int:
        return len(model.controlnet_down_blocks) + 1

    def made_for(self, keys: FileKeys) -> str | None:
        # every union model is SDXL's (the WebUI's pre-job check names a union picked on an SD1.5 checkpoint)
        config = keys.folder_config or {}
        return "sdxl" if keys.any_startswith("add_embedding.") or config.get("addition_embed_type") else None

    def owns(self, model) -> bool:
        return _CLASS is not None and isinstance(model, _CLASS)

    def panel_types(self, keys: FileKeys) -> tuple[str, ...] | None:
        """The panel's control types a file fits: every type its task embedding has (6 union, 8 ProMax)."""
        n_types = (keys.shapes.get("task_embedding") or (0,))[0] or int(
            (keys.folder_config or {}).get("num_control_type") or 0)
        return tuple(panel for union in UNION_TYPES[:n_types] for panel in PANEL_TYPES[union])


UNION = UnionKind()
