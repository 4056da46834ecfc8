"""The demo's synthetic domain: one coloured shape (circle, square, triangle) on a plain background, the caption
naming both colours and the shape ("a red circle on a white background"). The shape's outline is the control:
the fill50k task of the original ControlNet paper, in miniature. Nothing is downloaded.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

COLOURS = {
    "red": (220, 30, 30), "green": (30, 170, 50), "blue": (30, 60, 220), "yellow": (240, 210, 20),
    "purple": (140, 40, 180), "orange": (245, 130, 20),
}
BACKGROUNDS = {"white": (240, 240, 240), "black": (20, 20, 20), "gray": (128, 128, 128)}
SHAPES = ("circle", "square", "triangle")


def caption(colour: str, shape: str, background: str) -> str:
    return f"a {colour} {shape} on a {background} background"


def all_captions() -> list[str]:
    return [caption(c, s, b) for c in COLOURS for s in SHAPES for b in BACKGROUNDS]


def shape_mask(shape: str, centre: tuple[float, float], radius: float, size: int) -> np.ndarray:
    """Boolean mask of the shape, drawn at 4x and reduced, so edges are the same at every size."""
    scale = 4
    canvas = Image.new("L", (size * scale, size * scale), 0)
    draw = ImageDraw.Draw(canvas)
    cx, cy, r = centre[0] * scale, centre[1] * scale, radius * scale
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
    elif shape == "square":
        side = r * 0.9
        draw.rectangle([cx - side, cy - side, cx + side, cy + side], fill=255)
    elif shape == "triangle":
        draw.polygon([(cx, cy - r), (cx - r * 0.95, cy + r * 0.75), (cx + r * 0.95, cy + r * 0.75)], fill=255)
    else:
        raise ValueError(f"unknown shape {shape!r}; known: {', '.join(SHAPES)}")
    return np.asarray(canvas.resize((size, size), Image.BOX)) >= 128


def random_sample(rng: np.random.Generator, size: int = 64) -> tuple[Image.Image, str, np.ndarray]:
    """(image, caption, shape mask) for one random shape that lies wholly inside the image."""
    colour = list(COLOURS)[rng.integers(len(COLOURS))]
    background = list(BACKGROUNDS)[rng.integers(len(BACKGROUNDS))]
    shape = SHAPES[rng.integers(len(SHAPES))]
    radius = float(rng.uniform(0.16, 0.30) * size)
    margin = radius + 2
    centre = (float(rng.uniform(margin, size - margin)), float(rng.uniform(margin, size - margin)))
    mask = shape_mask(shape, centre, radius, size)
    pixels = np.empty((size, size, 3), np.uint8)
    pixels[:] = BACKGROUNDS[background]
    pixels[mask] = COLOURS[colour]
    return Image.fromarray(pixels), caption(colour, shape, background), mask


def samples(count: int, size: int = 64, seed: int = 0):
    rng = np.random.default_rng(seed)
    return [random_sample(rng, size) for _ in range(count)]


def write_images(folder, count: int, size: int = 64, seed: int = 0) -> list[Path]:
    """PNG images with caption .txt files beside them: the dataset builder's local-folder source."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for number, (image, text, _) in enumerate(samples(count, size, seed)):
        path = folder / f"shape-{number:04d}.png"
        image.save(path)
        path.with_suffix(".txt").write_text(text, encoding="utf-8")
        paths.append(path)
    return paths


def foreground_mask(image, threshold: float = 60.0) -> np.ndarray:
    """Pixels whose colour is far from the background's (the median colour of the image's border)."""
    pixels = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image, dtype=np.float32)
    border = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])
    background = np.median(border, axis=0)
    return np.linalg.norm(pixels - background, axis=-1) > threshold


def filled_outline(edges) -> np.ndarray:
    """The region an outline encloses (its pixels included): the shape a condition asks for."""
    from scipy import ndimage

    lines = np.asarray(edges.convert("L") if isinstance(edges, Image.Image) else edges) > 127
    lines = ndimage.binary_closing(lines, iterations=1)
    return ndimage.binary_fill_holes(lines)


def shape_iou(condition, generated) -> float:
    """IoU between the region the condition's outline encloses and the generated image's foreground."""
    wanted = filled_outline(condition)
    got = foreground_mask(generated)
    if wanted.shape != got.shape:
        got = np.asarray(Image.fromarray(got).resize(wanted.shape[::-1], Image.NEAREST))
    union = np.logical_or(wanted, got).sum()
    return float(np.logical_and(wanted, got).sum() / union) if union else 1.0
