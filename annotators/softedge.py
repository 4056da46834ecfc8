"""Soft edges and scribbles from HED, PiDiNet and TEED (controlnet-aux's networks, loaded by its own code).

Compared with calling the controlnet-aux detectors: one resize (done by preprocess) instead of three, the
side outputs upsampled, averaged and squashed on the tensor instead of five cv2 resizes and a float64 exp,
channels-last inference mode, and batches. PiDiNet's pixel-difference convolutions are re-expressed as the
plain convolutions they equal (PiDiNet's own "convert" form), which controlnet-aux does not do.
"""
from __future__ import annotations

import cv2
import numpy as np

from annotators.common import Params
from annotators.runtime import aux_module, batchable, inference, load_once, prepare, to_batch, to_uint8
from annotators.weights import find_weight


# ---------------------------------------------------------------- shared post-processing


def _safe_step(x, steps: int):
    """Quantise [0, 1] into `steps` levels (HED/PiDiNet "safe" maps: fewer, firmer edges)."""
    return (x * float(steps + 1)).floor_().div_(float(steps))


def _fuse_side_outputs(sides, size):
    """Side outputs at several scales -> sigmoid of their mean at full size (HED and TEED)."""
    import torch.nn.functional as F

    total = None
    for side in sides:
        side = side.float()
        if side.shape[-2:] != size:
            side = F.interpolate(side, size=size, mode="bilinear", align_corners=False)
        total = side if total is None else total + side
    return (total / len(sides)).sigmoid_()[:, 0]


def _scribble(edge: np.ndarray) -> np.ndarray:
    """Thin soft edges to scribble strokes: non-maximum suppression, then thicken by a blur and binarise."""
    x = cv2.GaussianBlur(edge.astype(np.float32), (0, 0), 3.0)
    kernels = [np.array(k, dtype=np.uint8) for k in (
        [[0, 0, 0], [1, 1, 1], [0, 0, 0]], [[0, 1, 0], [0, 1, 0], [0, 1, 0]],
        [[1, 0, 0], [0, 1, 0], [0, 0, 1]], [[0, 0, 1], [0, 1, 0], [1, 0, 0]])]
    peaks = np.zeros_like(x)
    for kernel in kernels:
        np.putmask(peaks, cv2.dilate(x, kernel=kernel) == x, x)
    thin = np.where(peaks > 127, 255, 0).astype(np.uint8)
    thick = cv2.GaussianBlur(thin, (0, 0), 3.0)
    return np.where(thick > 4, 255, 0).astype(np.uint8)


# ---------------------------------------------------------------- HED


def _hed_network():
    path = find_weight("ControlNetHED.pth", "softedge_hed")
    hed = aux_module("hed")
    detector = hed.HEDdetector.from_pretrained(str(path.parent), filename=path.name)
    block_class = _in_place_relu_block(hed.DoubleConvBlock)
    for block in detector.netNetwork.modules():
        if type(block) is hed.DoubleConvBlock:
            block.__class__ = block_class
    return prepare(detector.netNetwork)


def _in_place_relu_block(double_conv_block):
    """controlnet-aux's HED block with each ReLU applied in place on its convolution's fresh output (its own
    out-of-place F.relu allocated a new full-size map per layer: 7% of HED's time on two cores)."""
    import torch.nn.functional as F

    class InPlaceReluDoubleConvBlock(double_conv_block):
        def __call__(self, x, down_sampling=False):
            h = F.max_pool2d(x, kernel_size=(2, 2), stride=(2, 2)) if down_sampling else x
            for conv in self.convs:
                h = F.relu_(conv(h))
            return h, self.projection(h)

    return InPlaceReluDoubleConvBlock


def _hed(images, safe: bool):
    net = load_once("hed", _hed_network)
    with inference(low_precision=True):
        x = to_batch(images)
        edge = _fuse_side_outputs(net(x), x.shape[-2:])
        if safe:
            edge = _safe_step(edge, 2)
        return to_uint8(edge.mul_(255.0))


def _hed_plain(images, p: Params):
    return _hed(images, safe=False)


def _hed_safe(images, p: Params):
    return _hed(images, safe=True)


def _scribble_hed(images, p: Params):
    return [_scribble(edge) for edge in _hed(images, safe=False)]


hed = batchable(_hed_plain)
hed_safe = batchable(_hed_safe)
scribble_hed = batchable(_scribble_hed)


# ---------------------------------------------------------------- PiDiNet


def _convert_pidinet(net):
    """The same network with every pixel-difference conv replaced by the vanilla conv it equals (exact:
    central differences fold into the centre tap, angular ones into a permuted kernel, radial ones into a
    5x5 kernel)."""
    import torch

    model = aux_module("pidi.model")
    layer_ops = [model.nets["carv4"][f"layer{i}"] for i in range(16)]
    # the converted blocks pick their kernel size from the op *name*
    converted = model.PiDiNet(60, layer_ops, dil=24, sa=True, convert=True)
    state = {}
    for key, value in net.state_dict().items():
        weight = value
        if key == "init_block.weight" or (key.startswith("block") and key.endswith("conv1.weight")):
            index = 0 if key.startswith("init") else _block_index(key)
            weight = _vanilla_kernel(layer_ops[index], value, torch)
        state[key] = weight
    converted.load_state_dict(state)
    return converted


_BLOCKS = ["block1_1", "block1_2", "block1_3", "block2_1", "block2_2", "block2_3", "block2_4", "block3_1",
           "block3_2", "block3_3", "block3_4", "block4_1", "block4_2", "block4_3", "block4_4"]


def _block_index(key: str) -> int:
    return _BLOCKS.index(key.split(".")[0]) + 1


def _vanilla_kernel(op: str, w, torch):
    if op == "cv":
        return w
    if op == "cd":
        w = w.clone()
        w[:, :, 1, 1] -= w.sum(dim=(2, 3))
        return w
    flat = w.reshape(w.shape[0], w.shape[1], 9)
    if op == "ad":
        return (flat - flat[:, :, [3, 0, 1, 6, 4, 2, 7, 8, 5]]).reshape(w.shape)
    buffer = torch.zeros(w.shape[0], w.shape[1], 25, dtype=w.dtype)  # "rd"
    buffer[:, :, [0, 2, 4, 10, 14, 20, 22, 24]] = flat[:, :, 1:]
    buffer[:, :, [6, 7, 8, 11, 13, 16, 17, 18]] = -flat[:, :, 1:]
    return buffer.reshape(w.shape[0], w.shape[1], 5, 5)


def _pidinet_network():
    path = find_weight("table5_pidinet.pth", "softedge_pidinet")
    detector = aux_module("pidi").PidiNetDetector.from_pretrained(str(path.parent), filename=path.name)
    return prepare(_convert_pidinet(detector.netNetwork))


def _pidinet(images, safe: bool, sketch: bool = False):
    net = load_once("pidinet", _pidinet_network)
    with inference(low_precision=True):
        edge = net(to_batch(images, scale=1.0 / 255.0, bgr=True))[-1][:, 0].float()
        if safe:
            edge = _safe_step(edge, 2)
        if sketch:  # the T2I-Adapter sketch model's input: edges above one half, binary
            edge = (edge > 0.5).float()
        return to_uint8(edge.mul_(255.0))


def _pidinet_plain(images, p: Params):
    return _pidinet(images, safe=False)


def _pidinet_safe(images, p: Params):
    return _pidinet(images, safe=True)


def _scribble_pidinet(images, p: Params):
    return [_scribble(edge) for edge in _pidinet(images, safe=False)]


def _pidinet_sketch(images, p: Params):
    return _pidinet(images, safe=False, sketch=True)


pidinet = batchable(_pidinet_plain)
pidinet_sketch = batchable(_pidinet_sketch)
pidinet_safe = batchable(_pidinet_safe)
scribble_pidinet = batchable(_scribble_pidinet)


# ---------------------------------------------------------------- TEED


def _teed_network():
    path = find_weight("7_model.pth", "softedge_teed")
    detector = aux_module("teed").TEEDdetector.from_pretrained(str(path.parent), filename=path.name)
    return prepare(detector.model)


def _teed(images, p: Params):
    net = load_once("teed", _teed_network)
    steps = int(round(p.threshold_a))
    with inference():  # bfloat16 measured no faster on this small network
        x = to_batch(images)
        edge = _fuse_side_outputs(net(x), x.shape[-2:])
        if steps:
            edge = _safe_step(edge, steps)
        return to_uint8(edge.mul_(255.0))


teed = batchable(_teed)
