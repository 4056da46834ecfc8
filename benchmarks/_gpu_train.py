"""GPU suite, training sections: samples/s and peak GPU memory of our trainer's step against the reference step
written as diffusers' train_controlnet.py (SD1.5) / train_controlnet_sdxl.py (SDXL) do it, fp16 mixed precision,
with and without gradient checkpointing.

The base goes through our trainer's own loader (lib_controlnet.train.base.load_base) on a tiny folder of the
family first, so a family the trainer refuses is reported as such; then the loaded base's parts are replaced by
full-size random ones of the same names (nothing that large is written to disk). Both sides share that base;
each variant builds its own fp32 ControlNet and AdamW, and frees them before the next one, so each variant's
peak is its own (the shared base's weights are in every peak).
"""
from __future__ import annotations

import time

import torch

from benchmarks import _sd_models as models
from benchmarks import _train_steps as train_steps
from benchmarks._suite import Row, ratio

SETTINGS = {  # family -> (resolution, batch) full size; tiny runs use 64 px, batch 2
    "sd15": (512, 4),
    "sdxl": (1024, 1),
}
LABEL = {"sd15": "SD1.5", "sdxl": "SDXL"}


def _tiny_base_folder(family: str, folder) -> str:
    if (folder / "model_index.json").exists():
        return str(folder)
    if family == "sd15":
        from lib_controlnet.tiny_models import save_tiny_diffusers_base

        save_tiny_diffusers_base(folder)
        return str(folder)
    from diffusers import StableDiffusionXLPipeline

    from lib_controlnet import tiny_models

    encoders = models.text_encoders("sdxl", "tiny", "cpu", torch.float32)
    pipe = StableDiffusionXLPipeline(vae=tiny_models.tiny_vae(), text_encoder=encoders[0], text_encoder_2=encoders[1],
                                     tokenizer=tiny_models.tokenizer(), tokenizer_2=tiny_models.tokenizer(),
                                     unet=tiny_models.tiny_unet("sdxl"), scheduler=tiny_models.scheduler())
    pipe.save_pretrained(str(folder), safe_serialization=True)
    return str(folder)


def _full_size_base(base, family: str, ctx, weight_dtype) -> None:
    """Swap the loaded tiny parts for full-size random ones, by the component names the base holds."""
    encoders = models.text_encoders(family, "full", ctx.device, weight_dtype)
    full = {"unet": lambda: models.unet(family, False, ctx.device, weight_dtype),
            "vae": lambda: models.vae(family, False, ctx.device, weight_dtype),
            "text_encoder": lambda: encoders[0]}
    if family == "sdxl":
        full["text_encoder_2"] = lambda: encoders[1]
    for name, build in full.items():
        if hasattr(base, name):
            setattr(base, name, build())
    if hasattr(base, "freeze"):
        base.freeze()


def training_section(family: str):
    def run(ctx, deadline) -> list[Row]:
        from accelerate import Accelerator

        from lib_controlnet.errors import UserError
        from lib_controlnet.train.base import load_base

        section = f"{LABEL[family]} training"
        tiny, device, dev = ctx.tiny, ctx.device, ctx.dev
        try:
            base = load_base(_tiny_base_folder(family, ctx.work / f"base-{family}"))
        except UserError as error:
            return [Row(section, "our trainer vs train_controlnet reference",
                        status=f"not available: our trainer refuses an {LABEL[family]} base ({error})")]
        resolution, batch = (64, 2) if tiny else SETTINGS[family]
        weight_dtype = torch.float32 if tiny else torch.float16
        # the trainer's own rule: fp16 autocast needs a GPU (Trainer._accelerator)
        accelerator = Accelerator(mixed_precision="no" if tiny else "fp16", cpu=device.type == "cpu")
        if not tiny:
            _full_size_base(base, family, ctx, weight_dtype)
        for part in (base.vae, base.text_encoder, base.unet):  # where Trainer.run puts them (sd_locked)
            part.to(device, weight_dtype)
        warmup, max_steps = (1, 2) if tiny else (2, 10)
        batches = train_steps.make_inputs(resolution, batch, warmup + max_steps)
        reference_parts = None
        if family == "sdxl":
            reference_parts = dict(unet=base.unet, noise_scheduler=base.noise_scheduler,
                                   vae=models.vae("sdxl", tiny, device, torch.float32),
                                   text_encoders=models.text_encoders("sdxl", "tiny" if tiny else "full", device,
                                                                      weight_dtype),
                                   tokenizers=[base.tokenizer, getattr(base, "tokenizer_2", base.tokenizer)])

        variants = [(side, checkpointing) for checkpointing in (False, True) for side in ("reference", "ours")]
        measured = {}
        for index, (side, checkpointing) in enumerate(variants):
            if deadline.expired():
                break
            share = deadline.share(len(variants) - index)
            try:
                measured[(side, checkpointing)] = _run_variant(side, checkpointing, base, reference_parts, batches,
                                                               warmup, max_steps, batch, resolution, family, ctx,
                                                               accelerator, weight_dtype, share)
            except torch.cuda.OutOfMemoryError:
                measured[(side, checkpointing)] = "not measured: out of GPU memory"
            except Exception as error:  # one side failing (say, a trainer without SDXL steps) leaves the others
                measured[(side, checkpointing)] = f"failed: {side}: {type(error).__name__}: {error}"[:300]
            finally:
                accelerator.free_memory()
                dev.free()
            if family == "sdxl" and side == "reference":
                reference_parts.pop("text_encoders", None)  # the script frees them once embeddings are computed
        base.unet.disable_gradient_checkpointing()

        rows = []
        precision = "fp32 (CPU)" if tiny else "fp16 mixed precision"
        for checkpointing in (False, True):
            item = f"{resolution} px, batch {batch}, {precision}" + (", gradient checkpointing" if checkpointing else "")
            ours, reference = measured.get(("ours", checkpointing)), measured.get(("reference", checkpointing))
            failed = next((m for m in (ours, reference) if isinstance(m, str)), None)
            if failed or ours is None or reference is None:
                why = failed or f"not measured: the section's {deadline.limit:.0f} s ran out before both sides ran"
                rows.append(Row(section, item, status=why))
                continue
            rows.append(Row(section, item, "samples/s", ours["rate"], reference["rate"],
                            "train_controlnet" + ("_sdxl" if family == "sdxl" else "") + ".py step",
                            ratio(ours["rate"], reference["rate"]), "higher", ours["peak_gb"], reference["peak_gb"],
                            ours["steps"], note="peak = all allocated, shared frozen base included"))
        return rows

    return run


def _run_variant(side, checkpointing, base, reference_parts, batches, warmup, max_steps, batch, resolution, family,
                 ctx, accelerator, weight_dtype, deadline) -> dict:
    dev = ctx.dev
    controlnet = models.controlnet(family, ctx.tiny, ctx.device, torch.float32, seed=7)  # as from_unet: fp32
    controlnet.train().requires_grad_(True)
    if checkpointing:  # both scripts switch it on for both networks
        controlnet.enable_gradient_checkpointing()
        base.unet.enable_gradient_checkpointing()
    else:
        base.unet.disable_gradient_checkpointing()
    optimizer = train_steps.adamw(controlnet.parameters())
    if side == "ours":
        step = train_steps.our_steps(base, controlnet, batches, ctx.device, False, resolution, accelerator,
                                     weight_dtype, optimizer)
    else:
        prepared, optimizer = accelerator.prepare(controlnet, optimizer)
        if family == "sdxl":
            step = train_steps.reference_sdxl_steps(reference_parts, prepared, batches, ctx.device, accelerator,
                                                    weight_dtype, optimizer)
        else:
            step = train_steps.reference_steps(base, prepared, batches, ctx.device, accelerator, weight_dtype,
                                               optimizer)
    for b in batches[:warmup]:
        step(b)
    dev.reset_peak()
    started, done = time.perf_counter(), 0
    for b in batches[warmup:]:
        if deadline.expired() and done:
            break
        step(b)
        done += 1
    dev.sync()
    elapsed = time.perf_counter() - started
    return {"rate": done * batch / elapsed, "steps": done, "peak_gb": dev.peak_gb()}
