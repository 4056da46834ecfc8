"""Optional caches of VAE latents and prompt embeddings, computed once before training.

The latent cache keeps the VAE's distribution (mean and log-variance), not one sample of it, so training still
draws a fresh latent each time exactly as without the cache. Captions are cached once per distinct text
(including the empty prompt used by prompt dropout).
"""
from __future__ import annotations

import torch

from lib_controlnet.train.data import BatchPlan, TrainDataset, collate


class TrainCache:
    def __init__(self):
        self._latents: dict[int, torch.Tensor] = {}
        self._text: dict[str, torch.Tensor] = {}
        self._pooled: dict[str, torch.Tensor] = {}  # SDXL only
        self._time_ids: dict[int, torch.Tensor] = {}  # SDXL micro-conditioning of the crop the latents are of

    @property
    def has_latents(self) -> bool:
        return bool(self._latents)

    @property
    def has_text(self) -> bool:
        return bool(self._text)

    def latent_params(self, indices: torch.Tensor) -> torch.Tensor:
        return torch.stack([self._latents[int(i)] for i in indices]).float()

    def text_embeddings(self, texts: list[str]) -> torch.Tensor:
        return torch.stack([self._text[t] for t in texts]).float()

    def pooled_embeddings(self, texts: list[str]) -> torch.Tensor | None:
        return torch.stack([self._pooled[t] for t in texts]).float() if self._pooled else None

    def time_ids(self, indices: torch.Tensor) -> torch.Tensor:
        return torch.stack([self._time_ids[int(i)] for i in indices])

    @torch.no_grad()
    def build(self, dataset: TrainDataset, plan: BatchPlan, base, device, weight_dtype, latents: bool, text: bool,
              chunk: int = 8, progress=None) -> None:
        from lib_controlnet.train.step import encode_text

        count = len(dataset)
        square = (dataset.config.resolution, dataset.config.resolution)
        if latents:
            for start in range(0, count, chunk):
                items = []
                for index in range(start, min(count, start + chunk)):
                    size = plan.sample_sizes[index] if plan.sample_sizes else square
                    items.append(dataset[(index, 0, size[0], size[1])])
                # samples of different buckets have different sizes: encode them one size at a time
                for size in {tuple(i["pixel_values"].shape[1:]) for i in items}:
                    group = collate([i for i in items if tuple(i["pixel_values"].shape[1:]) == size])
                    pixels = group["pixel_values"].to(device, base.vae.dtype)
                    params = base.vae.encode(pixels).latent_dist.parameters.to("cpu", torch.float16)
                    for index, value, ids in zip(group["index"].tolist(), params, group["time_ids"]):
                        self._latents[index] = value.clone()
                        self._time_ids[index] = ids.clone()
                if progress:
                    progress(min(count, start + chunk), count)
        if text:
            captions = {""}
            for index in range(count):
                captions.add(dataset.records.load(index)[2])
            ordered = sorted(captions)
            for start in range(0, len(ordered), chunk):
                texts = ordered[start:start + chunk]
                embedded, pooled = encode_text(base, texts, device)
                self._text.update({t: e.to("cpu", torch.float16).clone() for t, e in zip(texts, embedded)})
                if pooled is not None:
                    self._pooled.update({t: p.to("cpu", torch.float16).clone() for t, p in zip(texts, pooled)})
