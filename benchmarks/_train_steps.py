"""Training steps to time, shared by bench_train.py and gpu_suite.py: the reference step written plainly the way
diffusers' `train_controlnet.py` (and `train_controlnet_sdxl.py`) do it, and our trainer's own step
(lib_controlnet.train.step.TrainingStep, set up as lib_controlnet.train.trainer.Trainer sets it up), on the same
models, batches and optimizer settings; plus the peak-memory meter and the synthetic batches.
"""
from __future__ import annotations

import contextlib
import os
import threading
import time


class PeakMemory:
    """Peak resident memory above a baseline, sampled in a thread (CPU), or CUDA's own counter."""

    def __init__(self, device):
        self.device, self.peak, self.baseline, self._stop = device, 0, 0, threading.Event()

    @staticmethod
    def rss() -> int:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def __enter__(self):
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.baseline = torch.cuda.memory_allocated()
            return self
        self.baseline = self.peak = self.rss()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.rss())
            time.sleep(0.002)

    def __exit__(self, *exc):
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated()
        else:
            self._stop.set()
            self._thread.join()

    @property
    def added_mb(self) -> float:
        return (self.peak - self.baseline) / 2**20


def make_inputs(resolution: int, batch: int, steps: int):
    """`steps` batches of synthetic (image, hint, caption) pairs as the trainer's loader gives them."""
    import numpy as np
    import torch

    from lib_controlnet.train.data import to_hint, to_target
    from lib_controlnet.train.synthetic import square_pair

    rng = np.random.default_rng(0)
    batches = []
    for step in range(steps):
        pairs = [square_pair(rng, resolution) for _ in range(batch)]
        batches.append({
            "pixel_values": torch.stack([to_target(image) for image, _ in pairs]),
            "conditioning_pixel_values": torch.stack([to_hint(hint) for _, hint in pairs]),
            "text": [f"a bright square, sample {step * batch + i}" for i in range(batch)],  # all captions distinct
            "index": torch.arange(step * batch, (step + 1) * batch),
            # SDXL micro-conditioning as the trainer's loader gives it: original size, crop top-left, target size
            "time_ids": torch.tensor([[resolution, resolution, 0, 0, resolution, resolution]] * batch,
                                     dtype=torch.float32),
        })
    return batches


def adamw(params):
    """Both scripts' AdamW settings (lr 1e-5 as lllyasviel; the rest diffusers' defaults)."""
    import torch

    return torch.optim.AdamW(params, lr=1e-5, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8)


def _backward_and_step(accelerator, controlnet, optimizer, loss, max_grad_norm=1.0):
    import torch

    if accelerator is None:
        loss.backward()
        torch.nn.utils.clip_grad_norm_(controlnet.parameters(), max_grad_norm)
    else:
        accelerator.backward(loss)
        if accelerator.sync_gradients:
            accelerator.clip_grad_norm_(controlnet.parameters(), max_grad_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=False)  # the scripts' default (--set_grads_to_none off)


def reference_steps(base, controlnet, batches, device, accelerator=None, weight_dtype=None, optimizer=None):
    """What diffusers' train_controlnet.py does per step. Without `accelerator`: one process in fp32, plain
    backward. With one (mixed precision): the frozen parts in `weight_dtype`, the ControlNet (fp32, prepared
    by `accelerator`) under its autocast, residuals cast to `weight_dtype` for the UNet, loss in fp32."""
    import torch
    import torch.nn.functional as F

    weight_dtype = weight_dtype or torch.float32
    vae, text_encoder, unet, scheduler = base.vae, base.text_encoder, base.unet, base.noise_scheduler
    optimizer = optimizer or adamw(controlnet.parameters())
    for batch in batches:  # the script tokenizes in its dataset preprocessing, outside the step
        batch["input_ids"] = base.tokenizer(batch["text"], max_length=base.tokenizer.model_max_length,
                                            padding="max_length", truncation=True, return_tensors="pt").input_ids

    def step(batch):
        window = accelerator.accumulate(controlnet) if accelerator is not None else contextlib.nullcontext()
        with window:
            latents = vae.encode(batch["pixel_values"].to(device, weight_dtype)).latent_dist.sample()
            latents = latents * vae.config.scaling_factor
            noise = torch.randn_like(latents)
            timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (latents.shape[0],), device=device)
            noisy_latents = scheduler.add_noise(latents, noise, timesteps.long())
            encoder_hidden_states = text_encoder(batch["input_ids"].to(device), return_dict=False)[0]
            controlnet_image = batch["conditioning_pixel_values"].to(device, weight_dtype)
            down, mid = controlnet(noisy_latents, timesteps, encoder_hidden_states=encoder_hidden_states,
                                   controlnet_cond=controlnet_image, return_dict=False)
            model_pred = unet(noisy_latents, timesteps, encoder_hidden_states=encoder_hidden_states,
                              down_block_additional_residuals=[s.to(weight_dtype) for s in down],
                              mid_block_additional_residual=mid.to(weight_dtype), return_dict=False)[0]
            target = noise if scheduler.config.prediction_type == "epsilon" else \
                scheduler.get_velocity(latents, noise, timesteps)
            loss = F.mse_loss(model_pred.float(), target.float(), reduction="mean")
            _backward_and_step(accelerator, controlnet, optimizer, loss)
        return loss

    return step


def reference_sdxl_steps(parts: dict, controlnet, batches, device, accelerator, weight_dtype, optimizer=None):
    """What diffusers' train_controlnet_sdxl.py does per step (`accelerator` None: one process, plain backward): prompt embeddings (both encoders) and the added
    time ids computed once beforehand, the encoders then dropped; the VAE kept in fp32 (SDXL's overflows in
    fp16), latents cast to `weight_dtype`; ControlNet and UNet get `added_cond_kwargs`."""
    import torch
    import torch.nn.functional as F

    vae, unet, scheduler = parts["vae"], parts["unet"], parts["noise_scheduler"]
    optimizer = optimizer or adamw(controlnet.parameters())
    with torch.no_grad():
        for batch in batches:
            if "prompt_ids" in batch:  # computed by an earlier variant, before the encoders were freed
                continue
            hidden, pooled = [], None
            for tokenizer, encoder in zip(parts["tokenizers"], parts["text_encoders"]):
                ids = tokenizer(batch["text"], max_length=tokenizer.model_max_length, padding="max_length",
                                truncation=True, return_tensors="pt").input_ids.to(device)
                out = encoder(ids, output_hidden_states=True)
                pooled = out[0]  # the last encoder's projected pooled output
                hidden.append(out.hidden_states[-2])
            size = batch["pixel_values"].shape[-1]
            time_ids = torch.tensor([[size, size, 0, 0, size, size]] * len(batch["text"]), device=device)
            batch["prompt_ids"] = torch.cat(hidden, dim=-1).to(weight_dtype)
            batch["unet_added_conditions"] = {"text_embeds": pooled.to(weight_dtype),
                                              "time_ids": time_ids.to(weight_dtype)}

    def step(batch):
        window = accelerator.accumulate(controlnet) if accelerator is not None else contextlib.nullcontext()
        with window:
            latents = vae.encode(batch["pixel_values"].to(device)).latent_dist.sample()
            latents = (latents * vae.config.scaling_factor).to(weight_dtype)
            noise = torch.randn_like(latents)
            timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (latents.shape[0],), device=device)
            noisy_latents = scheduler.add_noise(latents, noise, timesteps.long())
            controlnet_image = batch["conditioning_pixel_values"].to(device, weight_dtype)
            added = batch["unet_added_conditions"]
            down, mid = controlnet(noisy_latents, timesteps, encoder_hidden_states=batch["prompt_ids"],
                                   added_cond_kwargs=added, controlnet_cond=controlnet_image, return_dict=False)
            model_pred = unet(noisy_latents, timesteps, encoder_hidden_states=batch["prompt_ids"],
                              added_cond_kwargs=added, down_block_additional_residuals=[s.to(weight_dtype) for s in down],
                              mid_block_additional_residual=mid.to(weight_dtype), return_dict=False)[0]
            target = noise if scheduler.config.prediction_type == "epsilon" else \
                scheduler.get_velocity(latents, noise, timesteps)
            loss = F.mse_loss(model_pred.float(), target.float(), reduction="mean")
            _backward_and_step(accelerator, controlnet, optimizer, loss)
        return loss

    return step


def our_steps(base, controlnet, batches, device, cached: bool, resolution: int, accelerator=None,
              weight_dtype=None, optimizer=None):
    """Our trainer's step. Without `accelerator`, one is made here as the trainer makes it (full precision)."""
    import torch

    from lib_controlnet.train.cache import TrainCache
    from lib_controlnet.train.config import TrainConfig
    from lib_controlnet.train.step import TrainingStep, encode_text

    weight_dtype = weight_dtype or torch.float32
    if accelerator is None:
        from accelerate import Accelerator

        accelerator = Accelerator(cpu=device.type == "cpu")
    params = list(controlnet.parameters())
    optimizer = optimizer or adamw(params)
    controlnet, optimizer = accelerator.prepare(controlnet, optimizer)
    cache = TrainCache()
    if cached:  # filled the way TrainCache.build does, from the same tensors the reference gets
        with torch.no_grad():
            for batch in batches:
                params_ = base.vae.encode(batch["pixel_values"].to(device, weight_dtype)).latent_dist.parameters
                for index, value, ids in zip(batch["index"].tolist(), params_.to("cpu", torch.float16),
                                             batch["time_ids"]):
                    cache._latents[index], cache._time_ids[index] = value, ids
                hidden, pooled = encode_text(base, batch["text"], device)
                for row, text in enumerate(batch["text"]):
                    cache._text[text] = hidden[row].to("cpu", torch.float16)
                    if pooled is not None:
                        cache._pooled[text] = pooled[row].to("cpu", torch.float16)
        base.text_encoders_to("cpu")
    TrainConfig(resolution=resolution).validate()
    step = TrainingStep(base, controlnet, base.unet, device, weight_dtype, torch.Generator().manual_seed(0), cache,
                        accelerator, optimizer, params, max_grad_norm=1.0)
    return step.train_micro_batch
