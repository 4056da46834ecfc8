"""Validation during training: the user's (prompt, conditioning image) pairs through the current ControlNet with
diffusers' ControlNet pipeline of the base's architecture (SD1.x/SD2.x, or SDXL with pooled embeddings and its
default micro-conditioning), with a fixed seed so that images of different steps compare; and control
fidelity (`lib_controlnet.fidelity`) on rows of the dataset held out of training, the step-0 ControlNet's score
being the baseline.

Runs inside `torch.random.fork_rng`, so validating never changes the training's random stream (a run with
validation has the same loss curve as one without).
"""
from __future__ import annotations

import copy
import dataclasses
import time
from pathlib import Path

import torch
from PIL import Image

from lib_controlnet.train.data import load_hint_file, to_hint
from lib_controlnet.train.step import encode_text


class Validator:
    def __init__(self, base, config, device, weight_dtype):
        self.base, self.config, self.device, self.weight_dtype = base, config, device, weight_dtype
        self.pairs = config.validation_pairs()
        size = (config.resolution, config.resolution)
        self.hints = [load_hint_file(path, size) for _, path in self.pairs]
        # prompt embeddings now, so a cached-text run can move the text encoder off the device
        self.prompts = PromptEmbeddings(base, [p for p, _ in self.pairs], device) if self.pairs else None

    @property
    def enabled(self) -> bool:
        return bool(self.pairs)

    def run(self, controlnet, step: int, out_dir: Path) -> list[tuple[str, Image.Image, Path]]:
        if not self.pairs:
            return []
        folder = Path(out_dir) / f"step-{step:06d}"
        folder.mkdir(parents=True, exist_ok=True)
        results = []
        with control_pipeline(self.base, controlnet, self.device, self.weight_dtype) as pipe:
            for number, ((prompt, _), hint) in enumerate(zip(self.pairs, self.hints)):
                image = sample(pipe, self.prompts.arguments(range(number, number + 1), self.weight_dtype), hint,
                               self.config, self.config.validation_seed, self.device, self.weight_dtype)
                path = folder / f"{number:02d}.png"
                image.save(path)
                results.append((prompt, image, path))
        return results


class control_pipeline:
    """diffusers' ControlNet pipeline on the base's parts and `controlnet` in eval mode (a copy in the weight
    dtype when training keeps float32 weights), with torch's random streams forked: validating never changes
    the training's random stream (a run with validation has the same loss curve as one without)."""

    def __init__(self, base, controlnet, device, weight_dtype):
        self.base, self.controlnet, self.device, self.weight_dtype = base, controlnet, device, weight_dtype

    def __enter__(self):
        from diffusers import UniPCMultistepScheduler

        from lib_controlnet.base_model import ARCHITECTURES

        base = self.base
        self.model = model = (self.controlnet if self.weight_dtype == torch.float32
                              else _plain_copy(self.controlnet).to(self.weight_dtype))
        self.was_training = model.training
        model.eval()
        parts = dict(vae=base.vae, text_encoder=base.text_encoder, tokenizer=base.tokenizer, unet=base.unet,
                     controlnet=model, scheduler=UniPCMultistepScheduler.from_config(base.noise_scheduler.config))
        if base.is_sdxl:
            parts.update(text_encoder_2=base.text_encoder_2, tokenizer_2=base.tokenizer_2, add_watermarker=False)
        else:
            parts.update(safety_checker=None, feature_extractor=None, requires_safety_checker=False)
        pipe = ARCHITECTURES[base.family].pipeline_class(controlnet=True)(**parts)
        pipe.set_progress_bar_config(disable=True)
        self.hooks = _decode_in_vae_dtype(base.vae)
        self.rng = torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else [])
        self.rng.__enter__()
        return pipe

    def __exit__(self, *exc):
        self.rng.__exit__(*exc)
        for hook in self.hooks:
            hook.remove()
        self.model.train(self.was_training)
        return False


def _decode_in_vae_dtype(vae) -> list:
    """Latents in the VAE's dtype at decoding. The pipelines hand the UNet's half-precision latents to the VAE and
    upcast only an fp16 VAE with force_upcast; a VAE kept in fp32 beside a half UNet (SDXL's stock one, any
    force_upcast VAE) would refuse them."""
    def cast(module, args):
        weight = next(module.parameters())
        return (args[0].to(weight.dtype), *args[1:]) if args and args[0].dtype != weight.dtype else None

    return [module.register_forward_pre_hook(cast) for module in (getattr(vae, "post_quant_conv", None), vae.decoder)
            if module is not None]


def _plain_copy(controlnet):
    """A copy of the training ControlNet with its class's forward. Under mixed precision Accelerate sets an instance
    `forward` (autocast, outputs cast to fp32) bound to the original: a deep copy would still run the original and
    hand fp32 residuals to the half-precision UNet."""
    model = copy.deepcopy(controlnet)
    for name in ("forward", "_original_forward"):
        model.__dict__.pop(name, None)
    return model


class PromptEmbeddings:
    """The prompts' embeddings and the empty negative prompt's, computed once (a cached-text run then moves the
    text encoders off the device). SDXL adds the second encoder's pooled embeddings, and its negative is zeros, as
    diffusers' SDXL pipelines make an empty negative prompt (force_zeros_for_empty_prompt) and `generate` does."""

    def __init__(self, base, texts: list[str], device):
        hidden, pooled = encode_text(base, list(texts) + [""], device)
        if pooled is not None:
            hidden[-1:], pooled[-1:] = 0, 0
        self.hidden, self.pooled = hidden, pooled

    def arguments(self, rows: range, dtype) -> dict:
        """The pipeline's embedding arguments for prompts `rows`, each with the negative."""
        count = len(rows)
        arguments = dict(prompt_embeds=self.hidden[rows.start:rows.stop].to(dtype),
                         negative_prompt_embeds=self.hidden[-1:].expand(count, -1, -1).to(dtype))
        if self.pooled is not None:
            arguments.update(pooled_prompt_embeds=self.pooled[rows.start:rows.stop].to(dtype),
                             negative_pooled_prompt_embeds=self.pooled[-1:].expand(count, -1).to(dtype))
        return arguments


def sample(pipe, embeddings: dict, hint, config, seed: int, device, weight_dtype) -> Image.Image:
    generator = torch.Generator().manual_seed(seed)
    return pipe(**embeddings, image=hint.unsqueeze(0).to(device, weight_dtype),
                num_inference_steps=config.validation_inference_steps, generator=generator, height=hint.shape[1],
                width=hint.shape[2]).images[0]


class HeldOut:
    """The dataset's last rows, kept out of training for fidelity rounds; `train` is the rest, a records view."""

    def __init__(self, records, count: int):
        self.records, self.count = records, count
        self.train = _Head(records, len(records) - count)

    def rows(self) -> list[tuple[str, Image.Image, Image.Image]]:
        """(prompt, conditioning image, source image) of the held-out rows."""
        rows = []
        for index in range(len(self.records) - self.count, len(self.records)):
            image, hint, text = self.records.load(index)
            rows.append((text, hint.convert("RGB"), image.convert("RGB")))
        return rows


class _Head:
    """The first `limit` rows of a records object (HFRecords / FolderRecords), everything else passed through."""

    def __init__(self, records, limit: int):
        self._records, self._limit = records, limit

    def __len__(self) -> int:
        return self._limit

    def load(self, index: int):
        if index >= self._limit:
            raise IndexError(index)
        return self._records.load(index)

    def sizes(self):
        return self._records.sizes()[:self._limit]

    def __getattr__(self, name):
        return getattr(self._records, name)


@dataclasses.dataclass
class FidelityHistory:
    """What the training report, the export metadata and the checkpoints keep of the fidelity rounds."""
    score: str
    module: str
    samples: int
    definition: str
    rounds: list = dataclasses.field(default_factory=list)  # [[step, mean score]]; step 0 = untrained
    seconds: float = 0.0  # time spent in fidelity rounds

    @property
    def untrained(self):
        return next((value for step, value in self.rounds if step == 0), None)

    @property
    def latest(self):
        return self.rounds[-1][1] if self.rounds else None

    def to_dict(self) -> dict:
        return dict(dataclasses.asdict(self), untrained=self.untrained, latest=self.latest)

    @classmethod
    def from_dict(cls, values: dict) -> "FidelityHistory":
        fields = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in fields})


class FidelityValidator:
    """Control fidelity of the current ControlNet on the held-out rows: generate each row (fixed seed per row),
    re-detect with the dataset's preprocessor, score against the row's conditioning image."""
    BATCH = 8

    def __init__(self, base, config, device, weight_dtype, rows, module: str, threshold_a=None, threshold_b=None):
        from lib_controlnet.fidelity import Detector

        self.base, self.config, self.device, self.weight_dtype = base, config, device, weight_dtype
        self.detector = Detector(module, threshold_a, threshold_b)
        size = (config.resolution, config.resolution)
        self.hints = [to_hint(hint.resize(size, Image.BICUBIC)) for _, hint, _ in rows]
        self.conditions = [self.detector.condition(hint.resize(size, Image.BICUBIC), source.resize(size))
                           for _, hint, source in rows]
        self.detector.observe(rows[0][2].resize(size))  # fails now, not mid-run, if the preprocessor cannot run
        self.prompts = PromptEmbeddings(base, [text for text, _, _ in rows], device)
        score = self.detector.score
        self.history = FidelityHistory(score.name, module, len(rows), score.definition)

    def run(self, controlnet, step: int) -> tuple[float, list[Image.Image]]:
        from lib_controlnet.fidelity import measure

        started = time.monotonic()
        images = []
        with control_pipeline(self.base, controlnet, self.device, self.weight_dtype) as pipe:
            for first in range(0, len(self.hints), self.BATCH):  # rows in batches: far cheaper than one by one
                rows = range(first, min(first + self.BATCH, len(self.hints)))
                generators = [torch.Generator().manual_seed(self.config.validation_seed + i) for i in rows]
                hints = torch.stack([self.hints[i] for i in rows]).to(self.device, self.weight_dtype)
                images += pipe(**self.prompts.arguments(rows, self.weight_dtype), image=hints,
                               num_inference_steps=self.config.validation_inference_steps, generator=generators,
                               height=hints.shape[2], width=hints.shape[3]).images
        value = measure(self.detector, self.conditions, images).mean
        self.history.rounds = [r for r in self.history.rounds if r[0] != step] + [[step, value]]
        self.history.seconds += time.monotonic() - started
        return value, images


def hint_preview(hint: torch.Tensor) -> Image.Image:
    return Image.fromarray((hint.permute(1, 2, 0).clamp(0, 1).numpy() * 255).round().astype("uint8"))


__all__ = ["FidelityHistory", "FidelityValidator", "HeldOut", "Validator", "hint_preview", "to_hint"]
