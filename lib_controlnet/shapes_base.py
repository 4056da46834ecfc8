"""A tiny Stable Diffusion base that can draw the demo's domain (`lib_controlnet.shapes`): coloured shapes on
plain backgrounds, placed where it likes; the prompt picks the colours and the shape.

The project ships its weights (`configs/shapes_base.safetensors`, fp16, a few MB), trained by this module:

    python -m lib_controlnet.shapes_base --out lib_controlnet/configs/shapes_base.safetensors --minutes 40

It is the tiny SD1.5-shaped family of `tiny_models` (same UNet, VAE, text encoder configs), so a ControlNet
trained on it exports, loads and generates exactly as a full-size one does. The text encoder is the random,
frozen tiny one; the file keeps only the embedding rows the captions use (the rest stay zero), which is what
keeps it small. Training: the VAE first (reconstruction, a light KL term), then the UNet on its latents
(epsilon prediction, 10% empty prompts for classifier-free guidance).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from lib_controlnet import shapes, tiny_models
from lib_controlnet.settings import SHIPPED_CONFIGS_DIR

SHIPPED_WEIGHTS = SHIPPED_CONFIGS_DIR / "shapes_base.safetensors"
SIZE = 64  # image side; latents are 8x8


def _batch(rng: np.random.Generator, count: int, size: int = SIZE):
    items = [shapes.random_sample(rng, size) for _ in range(count)]
    pixels = torch.from_numpy(np.stack([np.asarray(image) for image, _, _ in items])).permute(0, 3, 1, 2)
    return pixels.float() / 127.5 - 1.0, [text for _, text, _ in items]


def _used_token_ids(tok) -> list[int]:
    ids = set(tok("", padding="max_length", max_length=tok.model_max_length).input_ids)
    for text in shapes.all_captions():
        ids.update(tok(text).input_ids)
    return sorted(ids)


def train_vae(vae, steps: int, batch: int, log, seed: int = 0, crop: int = 32):
    """On random crops: the VAE is convolutional, and a 32 px crop costs a quarter of a 64 px image."""
    rng = np.random.default_rng(seed)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=2e-3, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=2e-3, total_steps=steps, pct_start=0.05)
    vae.train()
    for step in range(1, steps + 1):
        pixels, _ = _batch(rng, batch)
        top, left = (int(v) for v in rng.integers(0, (SIZE - crop) // 8 + 1, 2) * 8)
        pixels = pixels[:, :, top:top + crop, left:left + crop]
        posterior = vae.encode(pixels).latent_dist
        recon = vae.decode(posterior.sample()).sample
        loss = F.mse_loss(recon, pixels) + 1e-6 * posterior.kl().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        if step % 50 == 0 or step == steps:
            log(f"vae step {step}/{steps} mse {loss.item():.5f}")
    vae.eval()
    with torch.no_grad():  # scaling factor: latents of unit variance, as SD's 0.18215 does for its VAE
        pixels, _ = _batch(rng, 256)
        std = vae.encode(pixels).latent_dist.mean.std().item()
    vae.register_to_config(scaling_factor=1.0 / std)
    return vae


def train_unet(unet, vae, text_encoder, tok, steps: int, batch: int, log, seed: int = 1, pool: int = 8192,
               checkpoint=None):
    """On a pool of pre-encoded images (the VAE is frozen by now), so a step costs only the UNet."""
    from diffusers import DDPMScheduler
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

    rng = np.random.default_rng(seed)
    params, captions = [], []
    with torch.no_grad():
        for _ in range(pool // 64):
            pixels, texts = _batch(rng, 64)
            params.append(vae.encode(pixels).latent_dist.parameters)
            captions += texts
    params = torch.cat(params)
    log(f"encoded a pool of {len(captions)} images")
    noise_scheduler = DDPMScheduler.from_config(tiny_models.scheduler().config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        texts = [""] + shapes.all_captions()
        tokens = tok(texts, padding="max_length", max_length=tok.model_max_length, return_tensors="pt").input_ids
        embeddings = dict(zip(texts, text_encoder(tokens)[0]))
    optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-3, weight_decay=1e-2)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=1e-3, total_steps=steps, pct_start=0.03)
    unet.train()
    scaling = vae.config.scaling_factor
    for step in range(1, steps + 1):
        rows = rng.integers(0, len(captions), batch)
        texts = ["" if rng.random() < 0.1 else captions[r] for r in rows]
        latents = DiagonalGaussianDistribution(params[torch.from_numpy(rows)]).sample(generator) * scaling
        noise = torch.randn(latents.shape, generator=generator)
        timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (batch,), generator=generator)
        noisy = noise_scheduler.add_noise(latents, noise, timesteps)
        hidden = torch.stack([embeddings[t] for t in texts])
        loss = F.mse_loss(unet(noisy, timesteps, encoder_hidden_states=hidden).sample, noise)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        if step % 100 == 0 or step == steps:
            log(f"unet step {step}/{steps} loss {loss.item():.5f}")
        if checkpoint and step % 1000 == 0:
            checkpoint(unet, step)
    return unet.eval()


def save_weights(path, unet, vae, text_encoder, tok, info: dict) -> Path:
    from safetensors.torch import save_file

    keep = torch.tensor(_used_token_ids(tok))
    tensors = {f"unet.{k}": v for k, v in unet.state_dict().items()}
    tensors.update({f"vae.{k}": v for k, v in vae.state_dict().items()})
    for key, value in text_encoder.state_dict().items():
        if key.endswith("token_embedding.weight"):
            tensors["text_encoder_token_ids"] = keep.to(torch.int32)
            value = value[keep]
        tensors[f"text_encoder.{key}"] = value
    tensors = quantize(tensors)
    metadata = {"scaling_factor": repr(vae.config.scaling_factor), "training": json.dumps(info)}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata=metadata)
    return path


SCALE_SUFFIX = ".int8_scale"


def quantize(tensors: dict) -> dict:
    """Weight matrices and kernels as int8 with one fp16 scale per output channel (half the bytes of fp16,
    which is what keeps the shipped file at a few MB); biases, norms and embeddings as fp16."""
    out = {}
    for key, value in tensors.items():
        if not value.is_floating_point():
            out[key] = value.contiguous()
        elif value.ndim >= 2 and value.numel() >= 1024 and "embedding" not in key:
            scale = value.float().abs().flatten(1).amax(dim=1).clamp(min=1e-12) / 127.0
            shape = (-1,) + (1,) * (value.ndim - 1)
            out[key] = torch.round(value.float() / scale.view(shape)).clamp(-127, 127).to(torch.int8).contiguous()
            out[key + SCALE_SUFFIX] = scale.half()
        else:
            out[key] = value.half().contiguous()
    return out


def dequantize(tensors: dict) -> dict:
    out = {}
    for key, value in tensors.items():
        if key.endswith(SCALE_SUFFIX):
            continue
        scale = tensors.get(key + SCALE_SUFFIX)
        if scale is not None:
            value = value.float() * scale.float().view((-1,) + (1,) * (value.ndim - 1))
        out[key] = value
    return out


def load_components(path=SHIPPED_WEIGHTS) -> dict:
    """The pipeline's parts, in float32, from a weights file this module wrote."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"shapes base weights {path} are missing; train them with "
                                f"`python -m lib_controlnet.shapes_base --out {path}`")
    components = tiny_models.tiny_sd_components("sd15", seed=0)
    with safe_open(str(path), "pt") as handle:
        scaling = float(handle.metadata()["scaling_factor"])
        tensors = dequantize({k: handle.get_tensor(k) for k in handle.keys()})
    for part in ("unet", "vae", "text_encoder"):
        prefix = part + "."
        state = {k[len(prefix):]: v.float() for k, v in tensors.items() if k.startswith(prefix)}
        module = components[part]
        if part == "text_encoder":
            key = next(k for k in state if k.endswith("token_embedding.weight"))
            full = torch.zeros_like(module.state_dict()[key])
            full[tensors["text_encoder_token_ids"].long()] = state[key]
            state[key] = full
        module.load_state_dict(state)
        module.eval()
    components["vae"].register_to_config(scaling_factor=scaling)
    return components


def save_diffusers_base(out, weights=SHIPPED_WEIGHTS) -> Path:
    """A complete diffusers folder of the shapes base, for every `--base` in the project."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(**load_components(weights), requires_safety_checker=False)
    pipe.save_pretrained(str(out), safe_serialization=True)
    return Path(out)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lib_controlnet.shapes_base", description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=str(SHIPPED_WEIGHTS), help="weights file to write (default: the shipped one)")
    parser.add_argument("--vae-steps", type=int, default=1500, help="VAE training steps (default 1500)")
    parser.add_argument("--unet-steps", type=int, default=6000, help="UNet training steps (default 6000)")
    parser.add_argument("--batch", type=int, default=32, help="batch size for both stages (default 32)")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads; 0 = torch's choice (default 0)")
    parser.add_argument("--samples", default="", help="also write a grid of generated samples to this PNG")
    parser.add_argument("--init", default="", help="start from this weights file (e.g. a partial one) instead of "
                                                   "random weights; --vae-steps 0 then keeps its VAE")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    started = time.monotonic()

    def log(text):
        print(f"[{time.monotonic() - started:6.0f}s] {text}", flush=True)

    parts = load_components(args.init) if args.init else tiny_models.tiny_sd_components("sd15", seed=0)
    text_encoder, tok = parts["text_encoder"].requires_grad_(False), parts["tokenizer"]
    vae = train_vae(parts["vae"], args.vae_steps, args.batch, log) if args.vae_steps else parts["vae"]
    vae.requires_grad_(False)
    def checkpoint(unet, step):  # a usable file along the way
        save_weights(args.out, unet.eval(), vae, text_encoder, tok, dict(unet_steps=step, partial=True))
        unet.train()
        log(f"saved {args.out} at UNet step {step}")

    unet = train_unet(parts["unet"], vae, text_encoder, tok, args.unet_steps, args.batch, log, checkpoint=checkpoint)
    info = dict(vae_steps=args.vae_steps, unet_steps=args.unet_steps, batch=args.batch, size=SIZE,
                seconds=round(time.monotonic() - started), torch=torch.__version__)
    path = save_weights(args.out, unet, vae, text_encoder, tok, info)
    log(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB)")
    if args.samples:
        write_sample_grid(path, args.samples)
        log(f"wrote {args.samples}")
    return 0


def write_sample_grid(weights, out, count: int = 8, steps: int = 20) -> Path:
    from diffusers import StableDiffusionPipeline, UniPCMultistepScheduler
    from PIL import Image

    components = load_components(weights)
    components["scheduler"] = UniPCMultistepScheduler.from_config(components["scheduler"].config)
    pipe = StableDiffusionPipeline(**components, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    texts = [text for _, text, _ in shapes.samples(count, SIZE, seed=123)]
    grid = Image.new("RGB", (SIZE * count, SIZE), "white")
    for i, text in enumerate(texts):
        image = pipe(text, num_inference_steps=steps, guidance_scale=3.0, height=SIZE, width=SIZE,
                     generator=torch.Generator().manual_seed(i)).images[0]
        grid.paste(image, (i * SIZE, 0))
    grid.save(out)
    Path(out).with_suffix(".txt").write_text("\n".join(texts) + "\n", encoding="utf-8")
    return Path(out)


if __name__ == "__main__":
    raise SystemExit(main())
