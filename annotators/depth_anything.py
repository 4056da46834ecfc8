"""Depth Anything (v1) and Depth Anything V2: a DINOv2 ViT encoder and a DPT head, written here.

Why here: the WebUI's transformers (4.30.2) has no DepthAnything model and controlnet-aux 0.0.10 has no
detector for it. The modules below carry the parameter names of the released `.pth` files (`pretrained.*`
for DINOv2, `depth_head.*` for the DPT head; the same layout in v1 and v2 and in the .safetensors copies the
other WebUI ControlNet extension downloads), so those files load as they are. The network's sizes are read from
the file (embedding width, depth, head widths), so ViT-S, ViT-B and ViT-L files all load through one path.

v1 decodes the last four blocks' tokens, v2 four blocks spread over the depth (V2's README: the change from v1).
The map as that extension makes it: the image scaled so its short side is 518 (sides multiples of 14, bicubic),
ImageNet normalisation, the network, the depth scaled back bilinearly to the image and stretched min..max to
0..255 (near is bright). That extension feeds the network BGR (it converts a picture it already holds as RGB);
here the network sees RGB, as it was trained and as transformers' pipeline does.

CPU schedule, the same computation up to float rounding: attention through PyTorch's fused
scaled_dot_product_attention; the layer-scale vectors folded into the linear layers before them; each fusion
block's 1x1 output convolution before its bilinear upsampling (they commute, see annotators/dpt_decoder.py);
the head's upsampled 128-channel map (the network's largest) computed in bands of rows, never whole.
"""
from __future__ import annotations

import dataclasses
import math

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from annotators.common import Params
from annotators.runtime import batchable, inference, load_once
from annotators.weights import find_first

PATCH = 14
NET_SIDE = 518  # the short side the network sees (37 patches): the released models' training size
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)

# Which blocks' tokens the head decodes, for v2, by encoder depth (Depth-Anything-V2's dpt.py, 0-based)
V2_LAYERS = {12: (2, 5, 8, 11), 24: (4, 11, 17, 23), 40: (9, 19, 29, 39)}

# The released files, largest first: a user's folder may hold any of them; the first one found is used.
# v1: LiheYoung/Depth-Anything's checkpoints; v2: depth-anything/Depth-Anything-V2-* (.pth) and the .safetensors
# copy the other WebUI ControlNet extension downloads (MackinationsAi/Depth-Anything-V2_Safetensors).
V1_FILES = ("depth_anything_vitl14.pth", "depth_anything_vitb14.pth", "depth_anything_vits14.pth")
V2_FILES = ("depth_anything_v2_vitl.pth", "depth_anything_v2_vitl.safetensors", "depth_anything_v2_vitb.pth",
            "depth_anything_v2_vitb.safetensors", "depth_anything_v2_vits.pth", "depth_anything_v2_vits.safetensors")


@dataclasses.dataclass(frozen=True)
class Config:
    dim: int = 1024
    depth: int = 24
    heads: int = 16
    features: int = 256
    out_channels: tuple = (256, 512, 1024, 1024)
    grid: int = 37  # the position embedding's side in patches (518 / 14)

    @classmethod
    def from_state_dict(cls, sd: dict) -> "Config":
        dim = sd["pretrained.cls_token"].shape[-1]
        depth = 1 + max(int(k.split(".")[2]) for k in sd if k.startswith("pretrained.blocks."))
        grid = math.isqrt(sd["pretrained.pos_embed"].shape[1] - 1)
        return cls(dim=dim, depth=depth, heads=max(1, dim // 64),  # DINOv2's heads are 64 wide at every size
                   features=sd["depth_head.scratch.layer1_rn.weight"].shape[0],
                   out_channels=tuple(sd[f"depth_head.projects.{i}.weight"].shape[0] for i in range(4)), grid=grid)


def layers_for(version: int, depth: int) -> tuple:
    if version == 1:
        return tuple(range(depth - 4, depth))
    if depth in V2_LAYERS:
        return V2_LAYERS[depth]
    step = depth // 4  # an encoder depth no release has: every quarter's last block
    return tuple(step * (i + 1) - 1 for i in range(4))


# ---------------------------------------------------------------- DINOv2 encoder


class _LayerScale(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return x * self.gamma


class _Attention(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        b, n, c = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(b, n, c))


class _Mlp(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.fc1 = nn.Linear(dim, dim * 4)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(dim * 4, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class _Block(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = _Attention(dim, heads)
        self.ls1 = _LayerScale(dim)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = _Mlp(dim)
        self.ls2 = _LayerScale(dim)

    def forward(self, x):
        x = x + self.ls1(self.attn(self.norm1(x)))
        return x + self.ls2(self.mlp(self.norm2(x)))


class _PatchEmbed(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.proj = nn.Conv2d(3, dim, PATCH, PATCH)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)


class DinoV2(nn.Module):
    def __init__(self, c: Config):
        super().__init__()
        self.patch_embed = _PatchEmbed(c.dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, c.dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, c.grid * c.grid + 1, c.dim))
        self.mask_token = nn.Parameter(torch.zeros(1, c.dim))  # training only; in every released file
        self.blocks = nn.ModuleList(_Block(c.dim, c.heads) for _ in range(c.depth))
        self.norm = nn.LayerNorm(c.dim, eps=1e-6)
        self._positions = {}

    def positions(self, rows: int, cols: int):
        """The position embedding resized to rows x cols patches as DINOv2 resizes it (bicubic, with its 0.1
        offset on the scale factors), kept per grid size."""
        key = (rows, cols, self.pos_embed.dtype, self.pos_embed.device)
        if key not in self._positions:
            grid = math.isqrt(self.pos_embed.shape[1] - 1)
            table = self.pos_embed[:, 1:].float().reshape(1, grid, grid, -1).permute(0, 3, 1, 2)
            if (rows, cols) != (grid, grid):
                table = F.interpolate(table, scale_factor=((rows + 0.1) / grid, (cols + 0.1) / grid),
                                      mode="bicubic", antialias=False)
            table = table.permute(0, 2, 3, 1).reshape(1, rows * cols, -1)
            self._positions[key] = torch.cat([self.pos_embed[:, :1].float(), table], 1).to(self.pos_embed.dtype)
        return self._positions[key]

    def features(self, x, layers):
        """Normed patch tokens after each block in `layers`."""
        rows, cols = x.shape[-2] // PATCH, x.shape[-1] // PATCH
        tokens = self.patch_embed(x)
        tokens = torch.cat([self.cls_token.expand(tokens.shape[0], -1, -1).to(tokens.dtype), tokens], 1)
        tokens = tokens + self.positions(rows, cols).to(tokens.dtype)
        out = []
        for index, block in enumerate(self.blocks[: max(layers) + 1]):
            tokens = block(tokens)
            if index in layers:
                out.append(self.norm(tokens)[:, 1:])
        return out


# ---------------------------------------------------------------- DPT head


class _ResidualConv(nn.Module):
    def __init__(self, features):
        super().__init__()
        self.conv1 = nn.Conv2d(features, features, 3, padding=1)
        self.conv2 = nn.Conv2d(features, features, 3, padding=1)

    def forward(self, x):
        return self.conv2(F.relu(self.conv1(F.relu(x)))) + x


class _Fusion(nn.Module):
    def __init__(self, features):
        super().__init__()
        self.resConfUnit1 = _ResidualConv(features)
        self.resConfUnit2 = _ResidualConv(features)
        self.out_conv = nn.Conv2d(features, features, 1)

    def forward(self, x, skip=None, size=None):
        if skip is not None:
            x = x + self.resConfUnit1(skip)
        x = self.out_conv(self.resConfUnit2(x))  # before the upsampling: a quarter of the pixels, same result
        if size is None:
            return F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=True)
        return F.interpolate(x, size=size, mode="bilinear", align_corners=True)


class DPTHead(nn.Module):
    def __init__(self, c: Config):
        super().__init__()
        oc = c.out_channels
        self.projects = nn.ModuleList(nn.Conv2d(c.dim, o, 1) for o in oc)
        self.resize_layers = nn.ModuleList([nn.ConvTranspose2d(oc[0], oc[0], 4, 4),
                                            nn.ConvTranspose2d(oc[1], oc[1], 2, 2),
                                            nn.Identity(), nn.Conv2d(oc[3], oc[3], 3, 2, 1)])
        scratch = nn.Module()
        for i, o in enumerate(oc):
            setattr(scratch, f"layer{i + 1}_rn", nn.Conv2d(o, c.features, 3, padding=1, bias=False))
            setattr(scratch, f"refinenet{i + 1}", _Fusion(c.features))
        scratch.output_conv1 = nn.Conv2d(c.features, c.features // 2, 3, padding=1)
        scratch.output_conv2 = nn.Sequential(nn.Conv2d(c.features // 2, 32, 3, padding=1), nn.ReLU(True),
                                             nn.Conv2d(32, 1, 1), nn.ReLU(True), nn.Identity())
        self.scratch = scratch

    def forward(self, tokens, rows, cols):
        s = self.scratch
        maps = []
        for i, t in enumerate(tokens):
            x = t.transpose(1, 2).reshape(t.shape[0], t.shape[2], rows, cols)
            x = self.resize_layers[i](self.projects[i](x))
            maps.append(getattr(s, f"layer{i + 1}_rn")(x))
        path = s.refinenet4(maps[3], size=maps[2].shape[2:])
        path = s.refinenet3(path, maps[2], size=maps[1].shape[2:])
        path = s.refinenet2(path, maps[1], size=maps[0].shape[2:])
        path = s.refinenet1(path, maps[0])
        return _banded_output(s.output_conv1(path), s.output_conv2, rows * PATCH, cols * PATCH)


BAND_ROWS = 32


def _banded_output(x, head, out_h, out_w):
    """head(F.interpolate(x, (out_h, out_w), bilinear, aligned corners)) computed in bands of output rows: the
    upsampled map (128 channels at the network's input size, 137 MB at 518 x 518) never exists whole."""
    from annotators.dpt_decoder import _upsampled_rows

    conv, pointwise = head[0], list(head)[1:]
    out = x.new_empty((x.shape[0], 1, out_h, out_w))
    x = x.contiguous(memory_format=torch.channels_last)
    for top in range(0, out_h, BAND_ROWS):
        bottom = min(top + BAND_ROWS, out_h)
        first, last = max(top - 1, 0), min(bottom + 1, out_h)
        rows = _upsampled_rows(x, first, last, out_h, out_w)
        rows = F.pad(rows, (0, 0, first - (top - 1), (bottom + 1) - last))  # the 3x3 convolution's zero padding
        band = F.conv2d(rows, conv.weight.to(rows.dtype), None if conv.bias is None else conv.bias.to(rows.dtype),
                        1, (0, conv.padding[1]))
        for layer in pointwise:
            band = layer(band)
        out[:, :, top:bottom] = band
    return out


class DepthAnything(nn.Module):
    """Parameter names as in the released files: `pretrained.*`, `depth_head.*`."""

    def __init__(self, c: Config, version: int):
        super().__init__()
        self.pretrained = DinoV2(c)
        self.depth_head = DPTHead(c)
        self.layers = layers_for(version, c.depth)

    def forward(self, x):
        """N x 3 x H x W (sides multiples of 14, ImageNet-normalised) -> N x H x W relative inverse depth."""
        rows, cols = x.shape[-2] // PATCH, x.shape[-1] // PATCH
        return F.relu(self.depth_head(self.pretrained.features(x, self.layers), rows, cols)).squeeze(1)


def fold_layer_scales(model: DepthAnything) -> None:
    """Fold each block's layer-scale vector into the linear layer before it (its rows and bias scaled): one
    elementwise pass per block fewer; the same function up to float rounding."""
    with torch.no_grad():
        for block in model.pretrained.blocks:
            for scale, linear in ((block.ls1, block.attn.proj), (block.ls2, block.mlp.fc2)):
                if isinstance(scale, _LayerScale):
                    linear.weight.mul_(scale.gamma[:, None])
                    linear.bias.mul_(scale.gamma)
            block.ls1, block.ls2 = nn.Identity(), nn.Identity()


# ---------------------------------------------------------------- loading and running


def load_state_dict(path) -> dict:
    if str(path).endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(str(path))
    return torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)


def build(state_dict: dict, version: int) -> DepthAnything:
    from annotators.weights import AnnotatorWeightsError

    try:
        model = DepthAnything(Config.from_state_dict(state_dict), version)
        model.load_state_dict(state_dict, strict=True)
    except (KeyError, RuntimeError, ValueError) as error:
        raise AnnotatorWeightsError(f"This file does not hold Depth Anything weights ({type(error).__name__}: "
                                    f"{str(error).splitlines()[0][:200]}).") from None
    return model


def _network(version: int):
    names = V1_FILES if version == 1 else V2_FILES
    label = "depth_anything" if version == 1 else "depth_anything_v2"
    path = find_first(names, label)
    model = build(load_state_dict(path), version)
    model.eval().requires_grad_(False)
    fold_layer_scales(model)
    from annotators.runtime import device

    return model.to(device())


def net_size(h: int, w: int, side: int = NET_SIDE) -> tuple[int, int]:
    """The network's input size for an h x w image: scaled so both sides reach `side`, each side then rounded
    to a multiple of 14 (up where rounding would go below `side`), as Depth Anything's Resize(lower_bound)."""
    scale = max(side / h, side / w)

    def fit(x):
        y = round(x / PATCH) * PATCH
        return int(math.ceil(x / PATCH) * PATCH) if y < side else int(y)

    return fit(scale * h), fit(scale * w)


def to_net_input(img: np.ndarray) -> torch.Tensor:
    """HxWx3 RGB uint8 -> 1 x 3 x H' x W' normalised float tensor at the network's size."""
    nh, nw = net_size(*img.shape[:2])
    x = cv2.resize(img.astype(np.float32) / 255.0, (nw, nh), interpolation=cv2.INTER_CUBIC)
    x = (x - np.asarray(MEAN, np.float32)) / np.asarray(STD, np.float32)
    return torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1)))[None]


def depth_map(depth: torch.Tensor, h: int, w: int) -> np.ndarray:
    """Network depth (H' x W') -> h x w uint8, min..max stretched to 0..255 (truncating, as that extension)."""
    depth = F.interpolate(depth[None, None].float(), (h, w), mode="bilinear", align_corners=False)[0, 0]
    low, high = depth.min(), depth.max()
    depth = (depth - low) / (high - low).clamp_min(1e-12) * 255.0
    return depth.cpu().numpy().astype(np.uint8)


def _run(images, version: int):
    from annotators.runtime import device

    net = load_once(f"depth_anything_v{version}", lambda: _network(version))
    out = []
    for img in images:  # one by one: images of one size could batch, but the network's input size varies anyway
        with inference(low_precision=True):
            depth = net(to_net_input(img).to(device()))[0].float()
        out.append(depth_map(depth, *img.shape[:2]))
    return out


def _v1(images, p: Params):
    return _run(images, 1)


def _v2(images, p: Params):
    return _run(images, 2)


depth_anything = batchable(_v1)
depth_anything_v2 = batchable(_v2)
