"""Turn whatever a user hands us into an RGB uint8 array, and fit arrays to a target size.

Accepted inputs: PIL images, numpy arrays, base64 strings (with or without a `data:` prefix), file paths,
raw encoded bytes. Every decodable mode becomes HxWx3 uint8:

- grayscale / 1-bit / palette / CMYK / YCbCr: converted to RGB;
- 16-bit and 32-bit integer images: scaled down to 8 bits (not clipped), float images: [0, 1] or [0, 255];
- anything with transparency (RGBA, LA, palette with transparency): composited on WHITE. This is what the
  WebUI ControlNet extension (and controlnet-aux's HWC3) do, so a transparent line drawing stays
  black-on-white instead of turning into a black square;
- EXIF orientation is applied, so a phone photo comes out the way the user sees it.

The pixel limit (MAX_PIXELS) is checked from the file header before any pixel is decoded.
"""
from __future__ import annotations

import base64
import binascii
import io
import warnings
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from lib_controlnet.errors import UserError
from lib_controlnet.unit import ResizeMode

# 50 megapixels: larger than any camera photo users feed ControlNet, small enough that the RGB array
# (150 MB) and a float working copy fit in memory.
MAX_PIXELS = 50_000_000


class ImageInputError(UserError):
    """An input that is not a usable image (unreadable, not an image, too large, empty)."""


def _check_size(width: int, height: int) -> None:
    if width <= 0 or height <= 0:
        raise ImageInputError(f"The image is empty ({width}x{height} pixels).")
    if width * height > MAX_PIXELS:
        raise ImageInputError(
            f"The image is too large: {width}x{height} pixels is more than the limit of "
            f"{MAX_PIXELS // 1_000_000} megapixels; scale it down first."
        )


# ---------------------------------------------------------------- decoding to PIL


def _bytes_from_string(text: str) -> bytes:
    """A string is a data URL or bare base64, never a file path: strings arrive from API clients, and a path
    would let them read (or probe for) files on the server. Files come in as `Path` objects."""
    stripped = text.strip()
    if stripped.startswith("data:"):
        header, _, payload = stripped.partition(",")
        if ";base64" not in header:
            raise ImageInputError("The data URL is not base64-encoded.")
        return _b64decode(payload)
    try:
        return _b64decode(stripped)
    except ImageInputError:
        short = stripped if len(stripped) <= 60 else stripped[:57] + "..."
        raise ImageInputError(f"{short!r} is not base64 image data.") from None


def _b64decode(payload: str) -> bytes:
    cleaned = "".join(payload.split())
    cleaned += "=" * (-len(cleaned) % 4)
    try:
        return base64.b64decode(cleaned, validate=True)
    except (binascii.Error, ValueError):
        raise ImageInputError("The image data is not valid base64.") from None


def _open(source: bytes | Path, label: str) -> Image.Image:
    """Open lazily (header only), check the size, then decode."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own limit is lower
            image = Image.open(source if isinstance(source, Path) else io.BytesIO(source))
    except FileNotFoundError:
        raise ImageInputError(f"No such image file: {label}.") from None
    except Image.DecompressionBombError:  # Pillow's own header check: far above MAX_PIXELS
        raise ImageInputError(
            f"The image is too large: more than the limit of {MAX_PIXELS // 1_000_000} megapixels; "
            f"scale it down first.") from None
    except UnidentifiedImageError:
        raise ImageInputError(f"{label} is not an image this program can read.") from None
    except OSError as error:
        raise ImageInputError(f"{label} could not be read as an image ({error}).") from None
    _check_size(*image.size)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image.load()
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        raise ImageInputError(f"{label} is a damaged or truncated image ({error}).") from None
    return image


def to_pil(obj: Any) -> Image.Image:
    """Decode any accepted input into a PIL image (any mode), EXIF orientation applied."""
    if isinstance(obj, Image.Image):
        _check_size(*obj.size)
        image = obj
    elif isinstance(obj, np.ndarray):
        return Image.fromarray(to_rgb_array(obj))
    elif isinstance(obj, (bytes, bytearray, memoryview)):
        if len(obj) == 0:
            raise ImageInputError("The image data is empty.")
        image = _open(bytes(obj), "The uploaded data")
    elif isinstance(obj, Path):
        if not obj.is_file():
            raise ImageInputError(f"No such image file: {obj}.")
        image = _open(obj, str(obj))
    elif isinstance(obj, str):
        if not obj.strip():
            raise ImageInputError("The image is an empty string.")
        image = _open(_bytes_from_string(obj), "The base64 data")
    elif obj is None:
        raise ImageInputError("No image was given.")
    else:
        raise ImageInputError(f"Cannot read an image from a {type(obj).__name__}.")
    try:
        return ImageOps.exif_transpose(image)
    except Exception:  # a broken EXIF block must not lose an otherwise readable image
        return image


# ---------------------------------------------------------------- PIL / numpy to RGB uint8


def _composite_on_white(rgb: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    a = alpha.astype(np.float32)[..., None] / 255.0
    return (rgb.astype(np.float32) * a + 255.0 * (1.0 - a)).round().clip(0, 255).astype(np.uint8)


def _to_uint8(array: np.ndarray) -> np.ndarray:
    if array.dtype == np.uint8:
        return array
    if array.dtype == np.bool_:
        return array.astype(np.uint8) * 255
    if np.issubdtype(array.dtype, np.floating):
        finite = np.nan_to_num(array.astype(np.float32), nan=0.0, posinf=0.0, neginf=0.0)
        scale = 255.0 if finite.size and finite.max() <= 1.0 else 1.0
        return (finite * scale).round().clip(0, 255).astype(np.uint8)
    if np.issubdtype(array.dtype, np.integer):
        top = int(array.max()) if array.size else 0
        if array.dtype.itemsize == 1 or top <= 255 and array.dtype != np.uint16:
            return array.clip(0, 255).astype(np.uint8)
        # 16-bit data (also inside int32 "I" images): scale 0..65535 to 0..255
        return (array.astype(np.float32) / 257.0).round().clip(0, 255).astype(np.uint8)
    raise ImageInputError(f"Cannot use an array of type {array.dtype} as an image.")


def _array_to_rgb(array: np.ndarray) -> np.ndarray:
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[..., 0]
    if array.ndim == 2:
        _check_size(array.shape[1], array.shape[0])
        gray = _to_uint8(array)
        return np.ascontiguousarray(np.repeat(gray[..., None], 3, axis=2))
    if array.ndim != 3 or array.shape[2] not in (2, 3, 4):
        raise ImageInputError(f"An array of shape {array.shape} is not an image (expected HxW, HxWx3 or HxWx4).")
    _check_size(array.shape[1], array.shape[0])
    array = _to_uint8(array)
    if array.shape[2] == 2:  # gray + alpha
        gray = _composite_on_white(array[..., :1], array[..., 1])
        return np.ascontiguousarray(np.repeat(gray, 3, axis=2))
    if array.shape[2] == 4:
        return _composite_on_white(array[..., :3], array[..., 3])
    return np.ascontiguousarray(array)


def _pil_to_rgb(image: Image.Image) -> np.ndarray:
    mode = image.mode
    if mode == "RGB":
        return np.asarray(image, dtype=np.uint8).copy()
    if mode.startswith("I;16"):
        return _array_to_rgb(np.asarray(image).astype(np.uint16))
    if mode in ("I", "F"):
        return _array_to_rgb(np.asarray(image))
    if mode == "P" or mode == "PA":
        image = image.convert("RGBA")
        mode = "RGBA"
    if mode in ("RGBA", "LA", "La", "RGBa"):
        rgba = np.asarray(image.convert("RGBA"), dtype=np.uint8)
        return _composite_on_white(rgba[..., :3], rgba[..., 3])
    try:
        return np.asarray(image.convert("RGB"), dtype=np.uint8).copy()
    except (ValueError, OSError) as error:
        raise ImageInputError(f"Cannot convert an image in mode {mode} to RGB ({error}).") from None


def to_rgb_array(obj: Any) -> np.ndarray:
    """Any accepted input -> HxWx3 uint8 RGB, C-contiguous (a fresh array, never the caller's)."""
    if isinstance(obj, np.ndarray):
        if obj.size == 0:
            raise ImageInputError(f"The image array is empty (shape {obj.shape}).")
        out = _array_to_rgb(obj)
        return out.copy() if out is obj or np.shares_memory(out, obj) else out
    return _pil_to_rgb(to_pil(obj))


def encode_png_base64(array: np.ndarray) -> str:
    """HxW(x3) uint8 -> base64 PNG (what the WebUI API sends back), without a data: prefix."""
    ok, buffer = cv2.imencode(".png", array[..., ::-1] if array.ndim == 3 and array.shape[2] == 3 else array)
    if not ok:
        raise ImageInputError("The map could not be encoded as PNG.")
    return base64.b64encode(buffer.tobytes()).decode("ascii")


# ---------------------------------------------------------------- masks


def decode_mask(obj: Any, size: tuple[int, int] | None = None) -> np.ndarray:
    """A mask from any image input -> HxW uint8 in {0, 255}; 255 marks the area to repaint.

    An image with real transparency contributes its alpha (painted = opaque); otherwise a pixel counts as
    masked when its brightest channel is above half. `size` is (width, height) to resize to (nearest).
    """
    if isinstance(obj, np.ndarray):
        array = obj
        if array.ndim == 3 and array.shape[2] == 4 and array[..., 3].min() < array[..., 3].max():
            gray = _to_uint8(array[..., 3])
        else:
            gray = _array_to_rgb(array).max(axis=2)
    else:
        image = to_pil(obj)
        has_alpha = image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info)
        alpha = np.asarray(image.convert("RGBA"))[..., 3] if has_alpha else None
        if alpha is not None and alpha.min() < alpha.max():
            gray = alpha
        else:
            gray = _pil_to_rgb(image).max(axis=2)
    mask = np.where(gray > 127, 255, 0).astype(np.uint8)
    if size is not None and (mask.shape[1], mask.shape[0]) != tuple(size):
        mask = cv2.resize(mask, tuple(int(v) for v in size), interpolation=cv2.INTER_NEAREST)
    return mask


def split_image_and_mask(obj: Any) -> tuple[np.ndarray, np.ndarray | None]:
    """Gradio's sketch component and older API clients send {"image": ..., "mask": ...}; others a bare image."""
    if isinstance(obj, dict):
        image = to_rgb_array(obj.get("image"))
        raw_mask = obj.get("mask")
        mask = None if raw_mask is None else decode_mask(raw_mask, size=(image.shape[1], image.shape[0]))
        if mask is not None and not mask.any():
            mask = None
        return image, mask
    return to_rgb_array(obj), None


# ---------------------------------------------------------------- resizing


def _is_binary(img: np.ndarray) -> bool:
    return bool(np.all((img == 0) | (img == 255)))


def resize(img: np.ndarray, width: int, height: int) -> np.ndarray:
    """High-quality resize that keeps hard maps hard: area when shrinking, cubic when growing; a
    black/white map (canny, scribble, masks) is thresholded back to black/white afterwards."""
    h, w = img.shape[:2]
    if (w, h) == (width, height):
        return img
    shrinking = width * height < w * h
    out = cv2.resize(img, (width, height), interpolation=cv2.INTER_AREA if shrinking else cv2.INTER_CUBIC)
    if _is_binary(img):
        out = np.where(out > 127, 255, 0).astype(np.uint8)
    return out


def resize_to_target(img: np.ndarray, width: int, height: int, resize_mode: ResizeMode | str | int) -> np.ndarray:
    """Fit a map to the generation size the way WebUI ControlNet users know it.

    Just Resize: stretch to width x height. Crop and Resize: scale to cover, crop the centre.
    Resize and Fill: scale to fit inside, pad with the median colour of the map's border.
    """
    mode = ResizeMode.parse(resize_mode, "resize_mode")
    width, height = int(width), int(height)
    if width <= 0 or height <= 0:
        raise ImageInputError(f"The target size {width}x{height} is empty.")
    squeeze = img.ndim == 2
    if squeeze:
        img = img[..., None]
    h, w = img.shape[:2]
    if mode is ResizeMode.RESIZE:
        out = resize(img, width, height)
    elif mode is ResizeMode.INNER_FIT:
        k = max(width / w, height / h)
        sw, sh = max(width, round(w * k)), max(height, round(h * k))
        scaled = resize(img, sw, sh)
        top, left = (sh - height) // 2, (sw - width) // 2
        out = scaled[top:top + height, left:left + width]
    else:
        k = min(width / w, height / h)
        sw, sh = min(width, max(1, round(w * k))), min(height, max(1, round(h * k)))
        scaled = resize(img, sw, sh)
        if scaled.ndim == 2:
            scaled = scaled[..., None]
        border = np.concatenate([img[0], img[-1], img[:, 0], img[:, -1]], axis=0)
        fill = np.median(border, axis=0).astype(img.dtype)
        out = np.empty((height, width, img.shape[2]), dtype=img.dtype)
        out[:] = fill
        top, left = (height - sh) // 2, (width - sw) // 2
        out[top:top + sh, left:left + sw] = scaled
    if out.ndim == 2:  # cv2 drops a single channel axis
        out = out[..., None]
    out = np.ascontiguousarray(out)
    return out[..., 0] if squeeze else out
