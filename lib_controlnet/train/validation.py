"""Validation images during training: the user's (prompt, conditioning image) pairs through the current
ControlNet with diffusers' ControlNet pipeline, with a fixed seed so that images of different steps compare.

Runs inside `torch.random.fork_rng`, so validating never changes the training's random stream (a run with
validation has the same loss curve as one without).
"""
from __future__ import annotations

import copy
from pathlib import Path

import torch
from PIL import Image

from lib_controlnet.train.data import load_hint_file, to_hint
from lib_controlnet.train.step import encode_prompts


class Validator:
    def __init__(self, base, config, device, weight_dtype):
        self.base, self.config, self.device, self.weight_dtype = base, config, device, weight_dtype
        self.pairs = config.validation_pairs()
        size = (config.resolution, config.resolution)
        self.hints = [load_hint_file(path, size) for _, path in self.pairs]
        # prompt embeddings now, so a cached-text run can move the text encoder off the device
        prompts = [p for p, _ in self.pairs]
        self.embeddings = encode_prompts(base, prompts + [""], device) if self.pairs else None

    @property
    def enabled(self) -> bool:
        return bool(self.pairs)

    def run(self, controlnet, step: int, out_dir: Path) -> list[tuple[str, Image.Image, Path]]:
        from diffusers import StableDiffusionControlNetPipeline, UniPCMultistepScheduler

        if not self.pairs:
            return []
        devices = [self.device] if self.device.type == "cuda" else []
        model = controlnet if self.weight_dtype == torch.float32 else copy.deepcopy(controlnet).to(self.weight_dtype)
        was_training = model.training
        model.eval()
        pipe = StableDiffusionControlNetPipeline(
            vae=self.base.vae, text_encoder=self.base.text_encoder, tokenizer=self.base.tokenizer,
            unet=self.base.unet, controlnet=model, safety_checker=None, feature_extractor=None,
            scheduler=UniPCMultistepScheduler.from_config(self.base.noise_scheduler.config),
            requires_safety_checker=False,
        )
        pipe.set_progress_bar_config(disable=True)
        folder = Path(out_dir) / f"step-{step:06d}"
        folder.mkdir(parents=True, exist_ok=True)
        results = []
        negative = self.embeddings[-1:].to(self.weight_dtype)
        with torch.random.fork_rng(devices=devices):
            for number, ((prompt, _), hint) in enumerate(zip(self.pairs, self.hints)):
                generator = torch.Generator().manual_seed(self.config.validation_seed)
                image = pipe(
                    prompt_embeds=self.embeddings[number:number + 1].to(self.weight_dtype),
                    negative_prompt_embeds=negative, image=hint.unsqueeze(0).to(self.device, self.weight_dtype),
                    num_inference_steps=self.config.validation_inference_steps, generator=generator,
                    height=hint.shape[1], width=hint.shape[2],
                ).images[0]
                path = folder / f"{number:02d}.png"
                image.save(path)
                results.append((prompt, image, path))
        model.train(was_training)
        return results


def hint_preview(hint: torch.Tensor) -> Image.Image:
    return Image.fromarray((hint.permute(1, 2, 0).clamp(0, 1).numpy() * 255).round().astype("uint8"))


__all__ = ["Validator", "hint_preview", "to_hint"]
