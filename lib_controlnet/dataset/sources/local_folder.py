"""Candidates from a folder of images; a `<stem>.txt` beside an image is its caption."""
from __future__ import annotations

import math
from pathlib import Path

from lib_controlnet.errors import UserError

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}


def read_local_folder(config) -> list[dict]:
    folder = Path(config.image_dir)
    if not folder.is_dir():
        raise UserError(f"Image folder {folder} does not exist.")
    rows = []
    for path in sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()):
        caption_file = path.with_suffix(".txt")
        caption = caption_file.read_text("utf-8", errors="replace").strip() if caption_file.is_file() else ""
        rows.append(
            {
                "url": str(path.resolve()),
                "caption": caption,
                "similarity": math.nan,
                "source_id": str(path.relative_to(folder)),
                "query": "",
                "source": "local_folder",
            }
        )
    if not rows:
        raise UserError(f"Image folder {folder} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))}).")
    return rows
