"""One training step: encode (or read cached) latents and prompts, add noise, run ControlNet + frozen UNet, loss.

Kept apart from the loop so the benchmark can time exactly what the trainer does per batch. Every random
draw (latent sampling, noise, timesteps) comes from one CPU generator whose state the checkpoints keep.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from lib_controlnet.train.cache import TrainCache


class TrainingStep:
    def __init__(self, base, controlnet, unet, device, weight_dtype, noise_generator: torch.Generator,
                 cache: TrainCache | None = None, accelerator=None, optimizer=None, params=None,
                 max_grad_norm: float = 0.0):
        self.base, self.controlnet, self.unet = base, controlnet, unet  # controlnet/unet may be DDP-wrapped
        self.device, self.weight_dtype = device, weight_dtype
        self.generator = noise_generator
        self.cache = cache or TrainCache()
        self.scaling = base.vae.config.scaling_factor
        self.num_timesteps = base.noise_scheduler.config.num_train_timesteps
        self.accelerator, self.optimizer, self.params = accelerator, optimizer, params
        self.max_grad_norm = max_grad_norm

    def train_micro_batch(self, batch) -> torch.Tensor:
        """Loss, backward and (when the accumulation window is full) clip + optimizer step. Gradients are
        dropped (set to None) rather than zeroed, so they hold no memory between steps. Grad mode is switched on
        here because callers (the WebUI's threads, test code) may have turned it off globally."""
        accelerator = self.accelerator
        with torch.enable_grad(), accelerator.accumulate(self.controlnet):
            loss = self.loss(batch)
            accelerator.backward(loss)
            if accelerator.sync_gradients and self.max_grad_norm > 0:
                accelerator.clip_grad_norm_(self.params, self.max_grad_norm)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    # ------------------------------------------------------------------ inputs
    @torch.no_grad()
    def latents(self, batch) -> torch.Tensor:
        from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

        if self.cache.has_latents:
            params = self.cache.latent_params(batch["index"]).to(self.device, torch.float32)
            dist = DiagonalGaussianDistribution(params)
        else:
            pixels = batch["pixel_values"].to(self.device, self.base.vae.dtype)
            dist = self.base.vae.encode(pixels).latent_dist
        return dist.sample(generator=self.generator).to(self.weight_dtype) * self.scaling

    @torch.no_grad()
    def prompt_embeddings(self, texts: list[str]) -> torch.Tensor:
        return self.text_conditions(texts)[0]

    @torch.no_grad()
    def text_conditions(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Hidden states for cross-attention and, for SDXL, the pooled embedding of the second encoder."""
        if self.cache.has_text:
            hidden, pooled = self.cache.text_embeddings(texts), self.cache.pooled_embeddings(texts)
        else:
            unique = sorted(set(texts))  # empty prompts and repeated captions are encoded once per batch
            rows = {text: i for i, text in enumerate(unique)}
            order = [rows[t] for t in texts]
            hidden, pooled = encode_text(self.base, unique, self.device)
            hidden, pooled = hidden[order], (pooled[order] if pooled is not None else None)
        hidden = hidden.to(self.device, self.weight_dtype)
        return hidden, (pooled.to(self.device, self.weight_dtype) if pooled is not None else None)

    def added_conditions(self, batch, pooled) -> dict:
        """SDXL's added conditions: pooled text + each sample's (original size, crop top-left, target size)."""
        if pooled is None:
            return {}
        time_ids = self.cache.time_ids(batch["index"]) if self.cache.has_latents else batch["time_ids"]
        return {"added_cond_kwargs": {"text_embeds": pooled,
                                      "time_ids": time_ids.to(self.device, self.weight_dtype)}}

    # ------------------------------------------------------------------ loss
    def loss(self, batch) -> torch.Tensor:
        latents = self.latents(batch)
        hidden, pooled = self.text_conditions(batch["text"])
        added = self.added_conditions(batch, pooled)
        count = latents.shape[0]
        noise = torch.randn(latents.shape, generator=self.generator).to(self.device, latents.dtype)
        timesteps = torch.randint(0, self.num_timesteps, (count,), generator=self.generator).to(self.device)
        scheduler = self.base.noise_scheduler
        noisy = scheduler.add_noise(latents, noise, timesteps)
        hint = batch["conditioning_pixel_values"].to(self.device, self.weight_dtype)
        down, mid = self.controlnet(noisy, timesteps, encoder_hidden_states=hidden, controlnet_cond=hint,
                                    return_dict=False, **added)
        prediction = self.unet(noisy, timesteps, encoder_hidden_states=hidden, **added,
                               down_block_additional_residuals=[r.to(self.weight_dtype) for r in down],
                               mid_block_additional_residual=mid.to(self.weight_dtype), return_dict=False)[0]
        if scheduler.config.prediction_type == "v_prediction":
            target = scheduler.get_velocity(latents, noise, timesteps)
        else:
            target = noise
        return F.mse_loss(prediction.float(), target.float(), reduction="mean")


@torch.no_grad()
def encode_prompts(base, texts: list[str], device) -> torch.Tensor:
    return encode_text(base, texts, device)[0]


@torch.no_grad()
def encode_text(base, texts: list[str], device) -> tuple[torch.Tensor, torch.Tensor | None]:
    """SD1/SD2: the encoder's last hidden state, no pooled output. SDXL (as its pipeline does): both encoders'
    penultimate hidden states side by side, and the second encoder's projected pooled output."""
    if not getattr(base, "is_sdxl", False):
        tokens = base.tokenizer(texts, max_length=base.tokenizer.model_max_length, padding="max_length",
                                truncation=True, return_tensors="pt")
        return base.text_encoder(tokens.input_ids.to(device), return_dict=False)[0], None
    hidden, pooled = [], None
    for tokenizer, encoder in ((base.tokenizer, base.text_encoder), (base.tokenizer_2, base.text_encoder_2)):
        tokens = tokenizer(texts, max_length=tokenizer.model_max_length, padding="max_length", truncation=True,
                           return_tensors="pt")
        output = encoder(tokens.input_ids.to(device), output_hidden_states=True)
        hidden.append(output.hidden_states[-2])
        pooled = output[0]
    return torch.cat(hidden, dim=-1), pooled


@torch.no_grad()
def heldout_loss(base, controlnet, batches, seed: int = 0, device="cpu") -> float:
    """Mean denoising loss over `batches` with fixed noise and timesteps (for evaluation, not training)."""
    generator = torch.Generator().manual_seed(seed)
    step = TrainingStep(base, controlnet, base.unet, torch.device(device), torch.float32, generator)
    losses = [step.loss(batch).item() for batch in batches]
    return sum(losses) / len(losses)
