"""Candidates from a Hugging Face dataset saved with `save_to_disk` (read with `datasets.load_from_disk`).

Rows are addressed as `hf://<folder>#<index>` so later stages can fetch the image bytes back lazily."""
from __future__ import annotations

import io
import math
from pathlib import Path

from lib_controlnet.errors import UserError

PREFIX = "hf://"


def _load(folder: str):
    import datasets

    try:
        loaded = datasets.load_from_disk(folder)
    except Exception as error:  # datasets raises FileNotFoundError or its own types
        raise UserError(f"Cannot open Hugging Face dataset folder {folder}: {error}") from None
    if isinstance(loaded, datasets.DatasetDict):
        split = "train" if "train" in loaded else next(iter(loaded))
        loaded = loaded[split]
    return loaded


def read_hf_disk(config) -> list[dict]:
    folder = str(Path(config.hf_dataset_dir).resolve())
    data = _load(folder)
    if config.hf_image_col not in data.column_names:
        raise UserError(f"Dataset {folder} has no '{config.hf_image_col}' column (it has: {', '.join(data.column_names)}).")
    captions = data[config.hf_caption_col] if config.hf_caption_col in data.column_names else [""] * len(data)
    return [
        {
            "url": f"{PREFIX}{folder}#{index}",
            "caption": "" if caption is None else str(caption),
            "similarity": math.nan,
            "source_id": str(index),
            "query": "",
            "source": "hf_disk",
        }
        for index, caption in enumerate(captions)
    ]


def image_bytes(url: str, image_col: str, cache: dict) -> bytes:
    """Encoded bytes of the image a `hf://` url points at (PNG when the dataset holds decoded arrays)."""
    import datasets
    import numpy as np
    from PIL import Image

    folder, index = url[len(PREFIX):].rsplit("#", 1)
    if folder not in cache:
        data = _load(folder)
        if isinstance(data.features.get(image_col), datasets.Image):
            data = data.cast_column(image_col, datasets.Image(decode=False))  # the stored bytes, not a re-encode
        cache[folder] = data
    raw = cache[folder][int(index)][image_col]
    if isinstance(raw, dict) and raw.get("bytes"):
        return raw["bytes"]
    if isinstance(raw, dict) and raw.get("path"):
        return Path(raw["path"]).read_bytes()
    if isinstance(raw, (bytes, bytearray)):
        return bytes(raw)
    image = raw if isinstance(raw, Image.Image) else Image.fromarray(np.asarray(raw, dtype=np.uint8))
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()
