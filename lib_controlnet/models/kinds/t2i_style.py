"""T2I-Adapter style model (TencentARC `t2iadapter_style_sd14v1.pth`): style tokens joining cross-attention.

The file holds a small transformer over a CLIP ViT-L/14 encoding of the reference image:
- `style_embedding` (1, tokens, width): learned queries appended to the encoder's last hidden states;
- `ln_pre`, then `transformer_layes.{i}` residual attention blocks (`attn.in_proj_weight`/`in_proj_bias`,
  `attn.out_proj.*`, `ln_1`, `mlp.c_fc`, `mlp.c_proj` with quick-GELU, `ln_2`; CLIP's text-tower layout);
- `ln_post` over the last `tokens` positions, then `proj` (width, context width): tokens of the UNet's
  cross-attention width (768: SD1.x, the only base it was trained for).
Width, depth, token count and context width are read from the shapes; the head count is not in the file and is
8 in TencentARC's config of the released model. The tokens are appended to the text context of every
cross-attention (lib_controlnet/style_attention.py).
"""
from __future__ import annotations

import re
from collections import OrderedDict
from pathlib import Path

import torch
import torch.nn.functional as F

from lib_controlnet.models.errors import ModelFileError
from lib_controlnet.models.kinds.base import ATTENTION, FileKeys, Kind
from lib_controlnet.models.loading import read_tensors

HEADS = 8
_BLOCK = re.compile(r"^transformer_layes\.(\d+)\.")


class _LayerNorm(torch.nn.LayerNorm):
    """Computed in fp32 whatever the weights' dtype, as the original model does for half precision."""

    def forward(self, x):
        return F.layer_norm(x.float(), self.normalized_shape, self.weight.float(), self.bias.float(),
                            self.eps).to(x.dtype)


class _QuickGELU(torch.nn.Module):
    def forward(self, x):
        return x * torch.sigmoid(1.702 * x)


class _Block(torch.nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.attn = torch.nn.MultiheadAttention(width, HEADS, batch_first=True)
        self.ln_1 = _LayerNorm(width)
        self.mlp = torch.nn.Sequential(OrderedDict([("c_fc", torch.nn.Linear(width, 4 * width)),
                                                    ("gelu", _QuickGELU()),
                                                    ("c_proj", torch.nn.Linear(4 * width, width))]))
        self.ln_2 = _LayerNorm(width)

    def forward(self, x):
        h = self.ln_1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.ln_2(x))


class StyleAdapter(torch.nn.Module):
    """Module names are the file's, so its state dict loads as it is."""

    def __init__(self, width: int, context_dim: int, depth: int, n_tokens: int):
        super().__init__()
        self.style_embedding = torch.nn.Parameter(torch.zeros(1, n_tokens, width))
        self.transformer_layes = torch.nn.Sequential(*[_Block(width) for _ in range(depth)])
        self.ln_pre = _LayerNorm(width)
        self.ln_post = _LayerNorm(width)
        self.proj = torch.nn.Parameter(torch.zeros(width, context_dim))

    @property
    def width(self) -> int:
        return self.proj.shape[0]

    @property
    def context_dim(self) -> int:
        return self.proj.shape[1]

    @property
    def n_tokens(self) -> int:
        return self.style_embedding.shape[1]

    @property
    def device(self):
        return self.proj.device

    @property
    def dtype(self):
        return self.proj.dtype

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """(N, positions, width) CLIP hidden states -> (N, tokens, context_dim) style tokens."""
        hidden = hidden.to(device=self.device, dtype=self.dtype)
        queries = self.style_embedding.expand(hidden.shape[0], -1, -1)
        x = self.transformer_layes(self.ln_pre(torch.cat([hidden, queries], dim=1)))
        return self.ln_post(x[:, -self.n_tokens:]) @ self.proj


def load_style_adapter(path: Path, keys: FileKeys, dtype=None, device="cpu") -> StyleAdapter:
    from lib_controlnet.models.controlnet_loader import parse_dtype

    name, shapes = Path(path).name, keys.shapes
    embedding, proj = shapes.get("style_embedding", ()), shapes.get("proj", ())
    depth = len({int(m.group(1)) for k in shapes if (m := _BLOCK.match(k))})
    if len(embedding) != 3 or len(proj) != 2 or proj[0] != embedding[2] or not depth:
        raise ModelFileError(f"{name} looks like a T2I-Adapter style model but its style_embedding, proj or "
                             "transformer_layes do not fit together.")
    if embedding[2] % HEADS:
        raise ModelFileError(f"{name} is a T2I-Adapter style model {embedding[2]} wide, which is not a multiple "
                             f"of its {HEADS} attention heads.")
    model = StyleAdapter(embedding[2], proj[1], depth, embedding[1])
    tensors = read_tensors(keys.weights_path)
    result = model.load_state_dict(tensors, strict=False)
    if result.missing_keys or result.unexpected_keys:
        names = ", ".join((result.missing_keys or result.unexpected_keys)[:3])
        raise ModelFileError(f"{name} is a T2I-Adapter style model whose tensors do not match its layout "
                             f"({'missing' if result.missing_keys else 'unexpected'}: {names}).")
    model = model.eval().requires_grad_(False)
    dtype = parse_dtype(dtype)
    if dtype is not None or str(device) != "cpu":
        model = model.to(device=device, dtype=dtype)
    return model


class T2IStyleKind(Kind):
    name = "T2I-Adapter style"
    control = ATTENTION
    averages_images = True  # several reference images on one unit: one style (their encodings averaged)

    def recognises(self, keys: FileKeys) -> bool:
        return keys.has("style_embedding")

    def load(self, path: Path, keys: FileKeys, dtype=None, device="cpu"):
        return load_style_adapter(path, keys, dtype=dtype, device=device)

    def made_for(self, keys: FileKeys) -> str | None:
        proj = keys.shapes.get("proj")
        return {768: "sd15", 1024: "sd2", 2048: "sdxl"}.get(proj[1]) if proj and len(proj) == 2 else None

    def n_outputs(self, model) -> int:
        return model.n_tokens

    def owns(self, model) -> bool:
        return isinstance(model, StyleAdapter)

    def panel_types(self, keys: FileKeys) -> tuple[str, ...] | None:
        # it takes a reference image, not a map: only its own type, whatever its name says
        return ("T2I-Adapter",)

    def embed_unit(self, prepared, width: int, height: int):
        from lib_controlnet.style_attention import style_tokens

        return style_tokens(prepared)

    def attach(self, model, modules: dict, current) -> list:
        from lib_controlnet.style_attention import attach

        return attach(model, modules, current)


T2I_STYLE = T2IStyleKind()
