"""Batch mode: a unit's control images (and optional masks) taken from folders, one per generated image."""
from __future__ import annotations

from pathlib import Path

from lib_controlnet.errors import UserError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


class BatchFolderError(UserError):
    pass


def folder_images(folder: str, what: str) -> list[Path]:
    """The folder's images in name order, or one sentence saying why there are none."""
    path = Path(folder).expanduser()
    if not path.is_dir():
        raise BatchFolderError(f"The {what} folder {folder!r} does not exist.")
    files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise BatchFolderError(f"The {what} folder {folder!r} holds no images.")
    return files


def pick(files: list, start: int, count: int) -> list:
    """`count` entries from `start`, wrapping around: a short folder repeats rather than failing mid-job."""
    return [files[(start + i) % len(files)] for i in range(count)]
