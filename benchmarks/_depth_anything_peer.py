"""bench_preprocess.py --depth-anything: Depth Anything v1/v2 against the authors' own code (controlnet-aux 0.0.10
has no Depth Anything), on the same random weights in the released layout, at the same preprocessor resolution.

The peer is the pipeline the other WebUI ControlNet extension runs: the authors' DepthAnythingV2 class from a
Depth-Anything-V2 checkout (v1: the same classes decoding the last four blocks), their Resize / NormalizeImage /
PrepareForNet transforms (short side 518, multiples of 14, cv2 bicubic), torch.no_grad, bilinear back to the
image size, min..max to 0..255. Their DINOv2 runs its plain attention (xFormers is not installed).
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

SIZES = {"vits": (64, [48, 96, 192, 384]), "vitb": (128, [96, 192, 384, 768]), "vitl": (256, [256, 512, 1024, 1024])}
NAMES = ("depth_anything", "depth_anything_v2")


def weight_files(size: str) -> dict:
    return {"depth_anything": f"depth_anything_{size}14.pth", "depth_anything_v2": f"depth_anything_v2_{size}.pth"}


def write_weights(folder: Path, size: str) -> None:
    """One random state dict in the released layout, saved under the v1 and the v2 name."""
    import torch

    from annotators import random_weights

    state = random_weights.depth_anything(size)
    for filename in weight_files(size).values():
        torch.save(state, folder / filename)


def reference_call(repo: str, path: Path, size: str, version: int):
    import cv2
    import numpy as np
    import torch
    import torch.nn.functional as F

    sys.path.insert(0, repo)
    from depth_anything_v2.dpt import DepthAnythingV2
    from depth_anything_v2.util.transform import NormalizeImage, PrepareForNet, Resize
    from torchvision.transforms import Compose

    features, channels = SIZES[size]
    model = DepthAnythingV2(encoder=size, features=features, out_channels=channels)
    model.load_state_dict(torch.load(str(path), map_location="cpu", weights_only=True))
    model.eval()
    if version == 1:
        model.intermediate_layer_idx[size] = 4  # v1's get_intermediate_layers(x, 4): the last four blocks
    transform = Compose([Resize(width=518, height=518, resize_target=False, keep_aspect_ratio=True,
                                ensure_multiple_of=14, resize_method="lower_bound",
                                image_interpolation_method=cv2.INTER_CUBIC),
                         NormalizeImage(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225]), PrepareForNet()])

    def call(img):
        h, w = img.shape[:2]
        x = torch.from_numpy(transform({"image": img / 255.0})["image"]).unsqueeze(0)
        with torch.no_grad():
            depth = model(x)
        depth = F.interpolate(depth[None], (h, w), mode="bilinear", align_corners=False)[0, 0]
        depth = (depth - depth.min()) / (depth.max() - depth.min()) * 255.0
        return depth.numpy().astype(np.uint8)

    return call


def child(args, images, timer, reset_peak, peak_mb) -> dict:
    """One side ("da-ours", "da-ours-float32", "da-reference") for the maps in args.names."""
    from lib_controlnet import preprocess

    result = {}
    for name in args.names.split(","):
        version = 1 if name == "depth_anything" else 2
        reset_peak()
        if args.side == "da-reference":
            call = reference_call(args.depth_anything, Path(args.weights) / weight_files(args.da_size)[name],
                                  args.da_size, version)
        else:
            def call(img, name=name):
                return preprocess.run(name, img, resolution=args.size, use_cache=False)
        started = time.perf_counter()
        result[name] = timer(call, images, args.reps)
        result[name + " peak_mb"] = peak_mb()
        result[name + " first_s"] = time.perf_counter() - started
    return result
