"""The demo's drawing base and its domain: the shipped weights stay small and load, int8 storage keeps every
weight within half a quantisation step, and the demo's shape IoU follows its definition."""
import json

import numpy as np
import torch
from PIL import Image
from safetensors import safe_open

from lib_controlnet import shapes, shapes_base


def test_shipped_weights_are_small_and_load():
    path = shapes_base.SHIPPED_WEIGHTS
    assert path.stat().st_size < 5e6
    with safe_open(str(path), "pt") as handle:
        assert json.loads(handle.metadata()["training"])["unet_steps"] > 0
    parts = shapes_base.load_components(path)
    assert parts["vae"].config.scaling_factor != 0.18215  # its own, measured on its latents
    tokens = parts["tokenizer"]("a red circle on a white background").input_ids
    rows = parts["text_encoder"].get_input_embeddings().weight[tokens]
    assert (rows.abs().sum(dim=1) > 0).all()  # every caption token kept its embedding row


def test_int8_round_trip_is_within_half_a_step():
    weight = torch.randn(64, 32, 3, 3)
    stored = shapes_base.quantize({"w": weight, "b": torch.randn(64)})
    assert stored["w"].dtype == torch.int8 and stored["b"].dtype == torch.float16
    restored = shapes_base.dequantize(stored)["w"]
    step = stored["w" + shapes_base.SCALE_SUFFIX].float().view(-1, 1, 1, 1)
    assert ((restored - weight).abs() <= step * 0.5 + 1e-3 * weight.abs().amax()).all()


def test_shape_iou_definition():
    image, _, mask = shapes.samples(1, 64, seed=7)[0]
    outline = np.zeros((64, 64), np.uint8)
    from scipy import ndimage

    outline[mask & ~ndimage.binary_erosion(mask)] = 255  # the shape's own outline
    assert shapes.shape_iou(Image.fromarray(outline), image) > 0.95
    moved = np.roll(outline, 32, axis=1)
    assert shapes.shape_iou(Image.fromarray(moved), image) < 0.2
    blank = Image.new("RGB", (64, 64), (240, 240, 240))
    assert shapes.shape_iou(Image.fromarray(outline), blank) == 0.0
