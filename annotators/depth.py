"""Depth maps: MiDaS DPT-Hybrid, LeReS / LeReS++ (boost) and ZoeDepth, through controlnet-aux's networks.

Near is bright, far is dark, as ControlNet's depth models were trained.
"""
from __future__ import annotations

import numpy as np

from annotators.common import Params
from annotators.runtime import (aux_module, batchable, inference, load_once, low_precision_dtype, prepare, to_batch,
                                to_uint8)
from annotators.weights import find_weight


def midas_network():
    path = find_weight("dpt_hybrid-midas-501f0c75.pt", "depth_midas")
    detector = aux_module("midas").MidasDetector.from_pretrained(str(path.parent), filename=path.name)
    net = prepare(detector.model)
    from annotators import dpt_decoder

    dpt_decoder.install(net.model, nchw=low_precision_dtype() is None)
    return net


def midas_depth(images, low_precision: bool = False):
    """Raw relative inverse depth, N x H x W float32 tensor (the network in bfloat16 if low_precision and
    the precision setting allow it)."""
    net = load_once("midas", midas_network)
    with inference(low_precision=low_precision):
        return net(to_batch(images, scale=1.0 / 127.5, offset=-1.0)).float()


def _normalise(depth):
    """Per image: min..max -> 0..1."""
    flat = depth.reshape(depth.shape[0], -1)
    low = flat.min(dim=1).values[:, None, None]
    high = (depth - low).reshape(depth.shape[0], -1).max(dim=1).values[:, None, None]
    return (depth - low) / high


def _midas(images, p: Params):
    depth = midas_depth(images, low_precision=True)
    with inference():
        return to_uint8(_normalise(depth).mul_(255.0))


midas = batchable(_midas)


# ---------------------------------------------------------------- LeReS


def _leres_detector():
    depth = find_weight("res101.pth", "depth_leres")
    pix2pix = find_weight("latest_net_G.pth", "depth_leres++")
    if pix2pix.parent != depth.parent:
        raise _leres_layout_error(depth, pix2pix)
    detector = aux_module("leres").LeresDetector.from_pretrained(
        str(depth.parent), filename=depth.name, pix2pix_filename=pix2pix.name)
    prepare(detector.model)
    from annotators.low_precision import LowPrecisionForward

    detector.model.depth_model = LowPrecisionForward(detector.model.depth_model)  # the boost's pix2pix stays float32
    return detector


def _leres_layout_error(depth, pix2pix):
    from annotators.weights import AnnotatorWeightsError

    return AnnotatorWeightsError(f"res101.pth and latest_net_G.pth must be in the same folder "
                                 f"(found {depth.parent} and {pix2pix.parent}).")


def _leres_any(img: np.ndarray, p: Params, boost: bool) -> np.ndarray:
    """controlnet-aux's LeReS pipeline on the already-resized image (its resize is then a no-op)."""
    import torch

    detector = load_once("leres", _leres_detector)
    if boost and max(img.shape[:2]) <= 128:
        # controlnet-aux's boost pass finds no patch size below this and fails with an internal error
        from lib_controlnet.errors import UserError

        raise UserError("depth_leres++ needs a preprocessor resolution whose long side is above 128 pixels.")
    with torch.inference_mode():
        return detector(img, thr_a=p.threshold_a, thr_b=p.threshold_b, boost=boost,
                        detect_resolution=min(img.shape[:2]), image_resolution=min(img.shape[:2]), output_type="np")


def leres(img: np.ndarray, p: Params) -> np.ndarray:
    return _leres_any(img, p, boost=False)


def leres_boost(img: np.ndarray, p: Params) -> np.ndarray:
    return _leres_any(img, p, boost=True)


# ---------------------------------------------------------------- ZoeDepth


def _zoe_network():
    path = find_weight("ZoeD_M12_N.pt", "depth_zoe")
    detector = aux_module("zoe").ZoeDetector.from_pretrained(str(path.parent), filename=path.name)
    from annotators import beit_attention

    beit_attention.install(detector.model)
    prepare(detector.model, channels_last=False)
    from annotators import dpt_decoder

    dpt_decoder.install(detector.model.core.core)
    return detector.model


def _zoe(images, p: Params):
    """Metric depth, mapped per image so the 2nd percentile is white and the 85th black (controlnet-aux's rule)."""
    net = load_once("zoe", _zoe_network)
    # bfloat16: barely faster here, and the percentile stretch magnifies its rounding. The flip augmentation's
    # mirrored pass stays a second batch-1 pass: in one batch it was no faster and took 0.6 GB more at 512 px.
    with inference():
        depth = net.infer(to_batch(images, scale=1.0 / 255.0, channels_last=False))[:, 0].cpu().numpy()
    out = []
    for d in depth:
        low, high = np.percentile(d, 2), np.percentile(d, 85)
        d = 1.0 - (d - low) / (high - low)
        out.append((d * 255.0).clip(0, 255).astype(np.uint8))
    return out


zoe = batchable(_zoe)
