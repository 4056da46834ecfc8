"""Synthetic training data whose target depends on the conditioning image alone: a bright square on a dark
background, placed at random; the conditioning image marks where (a small dot at its centre), the caption
says nothing about position. Used by `make demo`, the tests and the benchmark; nothing is downloaded.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

CAPTION = "a bright square"


def square_pair(rng: np.random.Generator, size: int = 64) -> tuple[Image.Image, Image.Image]:
    side = size // 4
    x, y = (int(v) for v in rng.integers(0, size - side, 2))
    colour = rng.integers(180, 256, 3).astype(np.uint8)
    image = np.full((size, size, 3), 20, np.uint8)
    image[y:y + side, x:x + side] = colour
    hint = np.zeros((size, size, 3), np.uint8)
    dot = max(2, side // 4)
    cx, cy = x + side // 2, y + side // 2
    hint[cy - dot:cy + dot, cx - dot:cx + dot] = 255
    return Image.fromarray(image), Image.fromarray(hint)


def write_folder_pair(root, count: int, size: int = 64, seed: int = 0) -> Path:
    """images/NNNN.png + NNNN.txt and conditioning/NNNN.png: the folder-pair dataset layout."""
    root = Path(root)
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "conditioning").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for number in range(count):
        image, hint = square_pair(rng, size)
        image.save(root / "images" / f"{number:04d}.png")
        hint.save(root / "conditioning" / f"{number:04d}.png")
        (root / "images" / f"{number:04d}.txt").write_text(CAPTION, encoding="utf-8")
    return root


def write_images(folder, count: int, size: int = 64, seed: int = 0) -> list[Path]:
    """Only the target images with caption files, for the dataset builder's local-folder source."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for number in range(count):
        image, _ = square_pair(rng, size)
        path = folder / f"square-{number:04d}.png"
        image.save(path)
        path.with_suffix(".txt").write_text(CAPTION, encoding="utf-8")
        paths.append(path)
    return paths
