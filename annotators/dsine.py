"""normal_dsine: surface normals from DSINE (Bae & Davison, CVPR 2024; `dsine.pt`), written here: controlnet-aux
0.0.10 has no DSINE, and the authors' code needs geffnet, which nothing else here uses.

The network as released: an EfficientNet-B5 encoder (TF "same" padding; timm's tf_efficientnet_b5 is the same
network and parameter names as the geffnet model the file was trained with), a decoder fed with each pixel's
camera ray, and a ConvGRU that refines the normals iteratively: each pixel's new normal is a weighted mix of its
5 x 5 neighbours' normals, each rotated about an axis and angle the network predicts, then upsampled 8x by
learned convex weights. Parameter names are the file's (`encoder.original_model.*`, `decoder.*`, `gru.*`,
`*_head.*`; the weights under "model", an optional `module.` prefix).

The map as the other WebUI ControlNet extension makes it: ImageNet normalisation, intrinsics from the field of
view (the "Fov" slider, degrees across the long side), "Iterations" refinement steps, the last prediction
mapped from -1..1 to 0..255 (x right, y down, z towards the camera, as DSINE predicts them). Sides are padded to
multiples of 32 (right and bottom, edge pixels) and the principal point stays at the image's centre.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from annotators.common import Params
from annotators.runtime import batchable, inference, load_once

PATCH = 5  # the refinement's neighbourhood (5 x 5)
DOWN = 8  # the decoder's output stride
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
# the encoder, from its stem width: the released file is B5; B0 is for tests
STEM_VARIANTS = {48: "tf_efficientnet_b5", 32: "tf_efficientnet_b0"}


def _head(cin, hidden, cout):
    return nn.Sequential(nn.Conv2d(cin, hidden, 3, padding=1), nn.ReLU(True), nn.Conv2d(hidden, hidden, 1),
                         nn.ReLU(True), nn.Conv2d(hidden, cout, 1))


class _StandardisedConv(nn.Conv2d):
    """A convolution with weight standardisation (zero mean, unit standard deviation per output channel, + 1e-5):
    at inference the standardised weights are computed once (`freeze`), not in every forward."""

    def standardised(self):
        w = self.weight - self.weight.mean(dim=(1, 2, 3), keepdim=True)
        return w / (w.view(w.shape[0], -1).std(dim=1).view(-1, 1, 1, 1) + 1e-5)

    def freeze(self):
        with torch.no_grad():
            self.weight.copy_(self.standardised())
        self.forward = lambda x: F.conv2d(x, self.weight, self.bias, self.stride, self.padding)

    def forward(self, x):
        return F.conv2d(x, self.standardised(), self.bias, self.stride, self.padding)


class _UpSample(nn.Module):
    def __init__(self, cin, cout):
        super().__init__()
        self._net = nn.Sequential(_StandardisedConv(cin, cout, 3, padding=1), nn.GroupNorm(8, cout), nn.LeakyReLU(),
                                  _StandardisedConv(cout, cout, 3, padding=1), nn.GroupNorm(8, cout), nn.LeakyReLU())

    def forward(self, x, skip):
        x = F.interpolate(x, size=skip.shape[2:], mode="bilinear", align_corners=False)
        return self._net(torch.cat([x, skip], 1))


class _Decoder(nn.Module):
    def __init__(self, width, skip16, skip8):
        super().__init__()
        self.conv2 = nn.Conv2d(width + 2, width, 1)
        self.up1 = _UpSample(width + skip16 + 2, width // 2)
        self.up2 = _UpSample(width // 2 + skip8 + 2, width // 4)
        self.normal_head = _head(width // 4 + 2, 128, 3)
        self.feature_head = _head(width // 4 + 2, 128, 64)
        self.hidden_head = _head(width // 4 + 2, 128, 64)

    def forward(self, f8, f16, f32, uv8, uv16, uv32):
        x = self.conv2(torch.cat([f32, uv32], 1))
        x = self.up1(x, torch.cat([f16, uv16], 1))
        x = torch.cat([self.up2(x, torch.cat([f8, uv8], 1)), uv8], 1)
        return F.normalize(self.normal_head(x), dim=1), self.feature_head(x), self.hidden_head(x)


class _Encoder(nn.Module):
    def __init__(self, variant, head_width):
        super().__init__()
        import timm

        self.original_model = timm.create_model(variant, pretrained=False, num_classes=0)
        head = self.original_model.conv_head
        if head.out_channels != head_width:  # a narrower head (tests): the file says how wide
            self.original_model.conv_head = type(head)(head.in_channels, head_width, 1, bias=False)
            self.original_model.bn2 = type(self.original_model.bn2)(head_width)

    def forward(self, x):
        """The decoder's inputs: stage 3's output (1/8), stage 5's (1/16), the head convolution's (1/32)."""
        m = self.original_model
        x = m.bn1(m.conv_stem(x))
        out = []
        for block in m.blocks:
            x = block(x)
            out.append(x)
        return out[2], out[4], m.conv_head(x)


class _ConvGRU(nn.Module):
    def __init__(self, hidden, inputs):
        super().__init__()
        self.convz = nn.Conv2d(hidden + inputs, hidden, PATCH, padding=PATCH // 2)
        self.convr = nn.Conv2d(hidden + inputs, hidden, PATCH, padding=PATCH // 2)
        self.convq = nn.Conv2d(hidden + inputs, hidden, PATCH, padding=PATCH // 2)

    def forward(self, h, x):
        hx = torch.cat([h, x], 1)
        z = torch.sigmoid(self.convz(hx))
        r = torch.sigmoid(self.convr(hx))
        q = torch.tanh(self.convq(torch.cat([r * h, x], 1)))
        return (1 - z) * h + z * q


def _ray_relu(normal, ray, eps=1e-2):
    """Turn normals that face away from the camera ray until their cosine with it is at least eps."""
    cos = torch.cosine_similarity(normal, ray, dim=1).unsqueeze(1)
    return F.normalize(normal + ray * (torch.relu(cos - eps) + eps - cos), dim=1)


def _unfold(x, size=PATCH):
    """N x C x H x W -> N x C x size^2 x H x W neighbourhoods (edges replicated)."""
    n, c, h, w = x.shape
    pad = (size - 1) // 2
    return F.unfold(F.pad(x, (pad, pad, pad, pad), mode="replicate"), size).view(n, c, size * size, h, w)


def _convex_upsample(x, mask, k=DOWN):
    n, c, h, w = x.shape
    mask = torch.softmax(mask.view(n, 1, 9, k, k, h, w), dim=2)
    up = F.unfold(F.pad(x, (1, 1, 1, 1), mode="replicate"), 3).view(n, c, 9, 1, 1, h, w)
    return F.normalize((mask * up).sum(2).permute(0, 1, 4, 2, 5, 3).reshape(n, c, k * h, k * w), dim=1)


def _rotate(axis_angle, v):
    """Rotate vectors v (..., 3) by axis-angle vectors (..., 3), through the unit quaternion, as pytorch3d's
    axis_angle_to_matrix (small angles by its series) and a matrix product."""
    angle = axis_angle.norm(dim=-1, keepdim=True)
    small = angle.abs() < 1e-6
    safe = torch.where(small, torch.ones_like(angle), angle)
    factor = torch.where(small, 0.5 - angle * angle / 48, torch.sin(angle * 0.5) / safe)
    r = torch.cos(angle * 0.5)[..., 0]
    i, j, k = (axis_angle * factor).unbind(-1)
    two_s = 2.0 / (r * r + i * i + j * j + k * k)
    x, y, z = v.unbind(-1)
    return torch.stack([
        (1 - two_s * (j * j + k * k)) * x + two_s * (i * j - k * r) * y + two_s * (i * k + j * r) * z,
        two_s * (i * j + k * r) * x + (1 - two_s * (i * i + k * k)) * y + two_s * (j * k - i * r) * z,
        two_s * (i * k - j * r) * x + two_s * (j * k + i * r) * y + (1 - two_s * (i * i + j * j)) * z], -1)


class DSINE(nn.Module):
    def __init__(self, variant="tf_efficientnet_b5", head_width=2048, skip16=176, skip8=64):
        super().__init__()
        self.encoder = _Encoder(variant, head_width)
        self.decoder = _Decoder(head_width, skip16, skip8)
        self.gru = _ConvGRU(64, 64 + 2)
        self.prob_head = _head(64 + 2, 64, PATCH * PATCH)
        self.xy_head = _head(64 + 2, 64, PATCH * PATCH * 2)
        self.angle_head = _head(64 + 2, 64, PATCH * PATCH)
        self.up_prob_head = _head(64 + 2, 64, 9 * DOWN * DOWN)

    @staticmethod
    def _pixels(h, w, device):
        """Pixel centres (x + 0.5, y + 0.5, 1), 1 x 3 x h x w."""
        ys, xs = torch.meshgrid(torch.arange(h, device=device, dtype=torch.float32) + 0.5,
                                torch.arange(w, device=device, dtype=torch.float32) + 0.5, indexing="ij")
        return torch.stack([xs, ys, torch.ones_like(xs)])[None]

    def forward(self, img, intrins, iterations: int):
        """img: N x 3 x H x W normalised (sides multiples of 32); intrins: N x 3 x 3 for that size. The last
        refinement's normals, N x 3 x H x W."""
        f8, f16, f32 = self.encoder(img)
        n, _, full_h, full_w = img.shape
        fu, fv = intrins[:, 0, 0], intrins[:, 1, 1]
        cu, cv = intrins[:, 0, 2] + 0.5, intrins[:, 1, 2] + 0.5

        def scaled(h, w):  # the intrinsics at 1/s of the image, as N x 1 x 1 x 1
            return [t[:, None, None, None] for t in (fu * (w / full_w), cu * (w / full_w),
                                                     fv * (h / full_h), cv * (h / full_h))]

        def uv(h, w):
            u_f, u_c, v_f, v_c = scaled(h, w)
            grid = self._pixels(h, w, img.device)
            return torch.cat([(grid[:, :1] - u_c) / u_f, (grid[:, 1:2] - v_c) / v_f], 1)

        h8, w8 = full_h // 8, full_w // 8
        uv8 = uv(h8, w8)
        ray8 = F.normalize(torch.cat([uv8, torch.ones_like(uv8[:, :1])], 1), dim=1)
        normal, feat, hidden = self.decoder(f8, f16, f32, uv8, uv(full_h // 16, full_w // 16),
                                            uv(full_h // 32, full_w // 32))
        normal = _ray_relu(normal, ray8)
        feat = torch.cat([feat, uv8], 1)
        u_f, u_c, v_f, v_c = scaled(h8, w8)
        pixels = _unfold(self._pixels(h8, w8, img.device))  # 1 x 3 x 25 x h x w (edges replicated)
        for _ in range(iterations):
            hidden = self.gru(hidden, feat)
            state = torch.cat([hidden, uv8], 1)
            prob = torch.sigmoid(self.prob_head(state)).unsqueeze(1)
            xs, ys = torch.split(self.xy_head(state), [PATCH * PATCH] * 2, dim=1)
            xy = F.normalize(torch.stack([xs, ys], 1), dim=1)
            angle = (torch.sigmoid(self.angle_head(state)) * math.pi).unsqueeze(1)
            neighbours = _unfold(normal)
            du, dv = xy[:, 0] / u_f, xy[:, 1] / v_f
            term_u = (pixels[:, 0] + xy[:, 0] - u_c) / u_f
            term_v = (pixels[:, 1] + xy[:, 1] - v_c) / v_f
            nx, ny, nz = neighbours.unbind(1)
            denom = term_u * nx + term_v * ny + nz
            denom = torch.where(denom.abs() < 1e-8, 1e-8 * torch.sign(denom), denom)
            dz = -(du * nx + dv * ny) / denom
            axes = F.normalize(torch.stack([du + dz * term_u, dv + dz * term_v, dz], 1), dim=1)
            axes = torch.where(torch.isfinite(axes).all(1, keepdim=True), axes, torch.zeros_like(axes))
            rotated = _rotate((axes * angle).permute(0, 2, 3, 4, 1), neighbours.permute(0, 2, 3, 4, 1))
            rotated = _ray_relu(F.normalize(rotated.permute(0, 4, 1, 2, 3), dim=1), ray8.unsqueeze(2))
            normal = F.normalize((prob * rotated).sum(2), dim=1)
        return _convex_upsample(normal, self.up_prob_head(torch.cat([hidden, uv8], 1)))


def build(state: dict) -> DSINE:
    from annotators.weights import AnnotatorWeightsError

    state = state.get("model", state)
    state = {k[len("module."):] if k.startswith("module.") else k: v for k, v in state.items()}
    try:
        stem = state["encoder.original_model.conv_stem.weight"].shape[0]
        model = DSINE(STEM_VARIANTS[stem], state["decoder.conv2.weight"].shape[0],
                      state["decoder.up1._net.0.weight"].shape[1] - state["decoder.conv2.weight"].shape[0] - 2,
                      state["decoder.up2._net.0.weight"].shape[1] - state["decoder.up1._net.0.weight"].shape[0] - 2)
        model.load_state_dict(state, strict=True)
    except (KeyError, RuntimeError) as error:
        raise AnnotatorWeightsError(f"This file does not hold DSINE weights ({type(error).__name__}: "
                                    f"{str(error).splitlines()[0][:200]}).") from None
    return model


def _network():
    from annotators.runtime import device
    from annotators.weights import find_weight

    path = find_weight("dsine.pt", "normal_dsine")
    model = build(torch.load(str(path), map_location="cpu", weights_only=True))
    model.eval().requires_grad_(False)
    for module in model.modules():
        if isinstance(module, _StandardisedConv):
            module.freeze()
    return model.to(device())


def intrinsics(h: int, w: int, fov: float) -> torch.Tensor:
    """The pinhole intrinsics for an h x w image whose long side spans `fov` degrees (top-left pixel at 0, 0)."""
    focal = (max(h, w) / 2.0) / np.tan(np.deg2rad(fov / 2.0))
    return torch.tensor([[focal, 0, w / 2.0 - 0.5], [0, focal, h / 2.0 - 0.5], [0, 0, 1]], dtype=torch.float32)


def _normals(images, p: Params):
    from annotators.runtime import device

    net = load_once("dsine", _network)
    iterations = max(1, int(round(p.threshold_b or 5)))
    out = []
    for img in images:
        h, w = img.shape[:2]
        ph, pw = -h % 32, -w % 32
        padded = np.pad(img, ((0, ph), (0, pw), (0, 0)), mode="edge") if ph or pw else img
        x = (torch.from_numpy(padded.astype(np.float32) / 255.0) - torch.tensor(MEAN)) / torch.tensor(STD)
        x = x.permute(2, 0, 1)[None].contiguous().to(device())
        with inference():  # float32: the refinement's rotations and normalisations amplify rounding
            normal = net(x, intrinsics(h, w, p.threshold_a)[None].to(device()), iterations)[0, :, :h, :w]
        out.append(((normal + 1) * 0.5).clamp(0, 1).permute(1, 2, 0).mul(255.0).cpu().numpy().astype(np.uint8))
    return out


normal_dsine = batchable(_normals)
