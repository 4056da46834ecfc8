"""Caption stage: which caption each sample trains with.

caption_mode "source": the caption that came with the image (alt text, .txt file, knn caption).
caption_mode "blip":   a BLIP-family captioner (transformers' BlipForConditionalGeneration) from a LOCAL folder.
caption_mode "both":   both, a column each; `text` is the source caption, or the generated one where the source
                       has none.
"""
from __future__ import annotations

import io
from pathlib import Path
from typing import Callable, Optional, Sequence

from lib_controlnet.errors import UserError


class CaptionerError(UserError):
    """The captioner folder is missing or does not hold a BLIP model and its processor."""


class Captioner:
    """BLIP from local files only (nothing is downloaded), batched, eval mode, no gradients."""

    def __init__(self, path: str, device: str = "cpu", max_new_tokens: int = 30):
        from transformers import BlipForConditionalGeneration, BlipProcessor

        folder = Path(path)
        if not folder.is_dir():
            raise CaptionerError(f"Captioner folder {folder} does not exist.")
        try:
            self.processor = BlipProcessor.from_pretrained(folder, local_files_only=True)
            self.model = BlipForConditionalGeneration.from_pretrained(folder, local_files_only=True)
        except (OSError, ValueError) as error:
            raise CaptionerError(f"Cannot load a BLIP captioner from {folder}: {error}") from None
        self.model.to(device).eval()
        self.device = device
        self.max_new_tokens = max_new_tokens

    def caption(self, images: Sequence) -> list[str]:
        import torch

        inputs = self.processor(images=list(images), return_tensors="pt").to(self.device)
        with torch.inference_mode():
            tokens = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens)
        return [text.strip() for text in self.processor.batch_decode(tokens, skip_special_tokens=True)]


def decode_rgb(data: bytes):
    from PIL import Image

    with Image.open(io.BytesIO(data)) as image:
        return image.convert("RGB")


def caption_rows(rows: list[dict], config, captioner: Optional[Captioner],
                 on_batch: Optional[Callable[[int], None]] = None) -> list[dict]:
    """rows: {key, caption, image bytes} -> [{key, text, source_caption, generated_caption}] in the same order."""
    generated = [""] * len(rows)
    if config.caption_mode in ("blip", "both") and captioner is not None:
        size = max(1, config.caption_batch_size)
        for start in range(0, len(rows), size):
            batch = rows[start:start + size]
            generated[start:start + len(batch)] = captioner.caption([decode_rgb(r["image"]) for r in batch])
            if on_batch:
                on_batch(len(batch))
    out = []
    for row, gen in zip(rows, generated):
        source = (row.get("caption") or "").strip()
        if config.caption_mode == "source":
            text = source
        elif config.caption_mode == "blip":
            text = gen
        else:
            text = source or gen
        out.append({"key": row["key"], "text": text, "source_caption": source, "generated_caption": gen})
    return out
