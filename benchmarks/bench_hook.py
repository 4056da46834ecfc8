"""Per-step cost of our ControlNet hook, against its parts and against diffusers' StableDiffusionControlNetPipeline.

    python benchmarks/bench_hook.py            # SD1.5-size UNet + ControlNet (random weights), 256x256 image
    python benchmarks/bench_hook.py --quick    # a mid-size SD1.5-shaped model (well under a minute here)
    python benchmarks/bench_hook.py --sdxl --image 512           # SDXL-size UNet + ControlNet (~18 GB fp32)
    python benchmarks/bench_hook.py --sdxl --quick --image 512   # a mid-size SDXL-shaped model
    python benchmarks/bench_hook.py --adapter  # a T2I-Adapter (full, same channels) instead of a ControlNet:
        adapter ratio = our per-step time / StableDiffusionAdapterPipeline's                       [<= 1.00]
        and the adapter's added cost over a plain step, beside a ControlNet's (it runs once per job)
    python benchmarks/bench_hook.py --sdxl --quick --lllite   # ControlNet-LLLite (needs --sdxl), per UNet call:
        lllite ratio = ours (pre-hooks) / kohya's definition as wrapper modules on the same layers   [<= 1.02]
        and LLLite's added cost over a plain step, beside a ControlNet's
    python benchmarks/bench_hook.py --sdxl --quick --control-lora   # a rank-128 Control-LoRA: its first job's
        read + merge and a later job's cache hit, against loading the same ControlNet as a full file
    python benchmarks/bench_hook.py --ip-adapter  # one IP-Adapter plus unit (benchmarks/_ip_adapter_steps.py):
        ip-adapter ratio = our per-step time / StableDiffusionPipeline's with the same IP-Adapter  [<= 1.00]
    python benchmarks/bench_hook.py --union --quick --image 256 --steps 3   # an SDXL ControlNet-Union (ProMax)
        union ratio = our per-step time with the union model / StableDiffusionXLControlNetPipeline's with the
        plain ControlNet of the same weights (the pinned diffusers has no union pipeline)          [<= 1.00]
        (on a busy shared machine `--threads 1` gives far steadier ratios than two contended threads)
    python benchmarks/bench_hook.py --reference [--reference-peer stable_diffusion_reference.py]
        reference_only / reference_adain+attn per step against a plain step (two UNet passes: 2x by design)
        and against diffusers' community StableDiffusionReferencePipeline (see benchmarks/_reference_steps.py)

Prints three ratios (lower is better), measured in one run on the same weights and inputs:
  hook overhead  = one hooked UNet step with one unit / (UNet step alone + ControlNet forward alone)  [<= 1.02]
  balanced       = our per-step time / StableDiffusionControlNetPipeline's                          [<= 0.95]
  cn-important   = ours in "ControlNet is more important" / the pipeline's guess_mode               [<= 1.00]
Timings are medians over interleaved repeats, so a busy machine hurts both sides alike. The VAE and text
encoder are tiny (they are outside the per-step loop); the UNet and ControlNet have the benchmarked size.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import lib_controlnet  # noqa: E402,F401  (torchvision repair first)
import numpy as np  # noqa: E402
import torch  # noqa: E402

from benchmarks import _pipeline_steps as pipeline_steps  # noqa: E402

SIZES = {
    "sd15": dict(sample_size=64, block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768, attention_head_dim=8),
    "quick": dict(sample_size=64, block_out_channels=(64, 128, 256, 256), cross_attention_dim=256, attention_head_dim=4),
}
# SDXL: the shipped SDXL UNet config; its quick variant keeps the layout (3 levels, depths 1/2/10 -> 1/1/2, both
# text encoders' widths side by side, pooled text + 6 micro-conditioning numbers) at a fraction of the channels.
SDXL_QUICK = dict(block_out_channels=(64, 128, 256), transformer_layers_per_block=(1, 1, 2),
                  attention_head_dim=(2, 4, 8), addition_time_embed_dim=32, cross_attention_dim=256 + 512,
                  projection_class_embeddings_input_dim=32 * 6 + 512)


def sdxl_unet_config(quick: bool) -> dict:
    from lib_controlnet.base_model import ARCHITECTURES
    from diffusers import UNet2DConditionModel

    config = dict(UNet2DConditionModel.load_config(str(ARCHITECTURES["sdxl"].config_dir), subfolder="unet"))
    config = {k: v for k, v in config.items() if not k.startswith("_")}
    return dict(config, **SDXL_QUICK) if quick else config


def build_sdxl(quick: bool):
    """SDXL-size (or quick) UNet and ControlNet with random weights; both text encoders small (outside the loop)
    but as wide as the UNet reads them."""
    from diffusers import ControlNetModel, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    from lib_controlnet import tiny_models

    torch.manual_seed(0)
    config = sdxl_unet_config(quick)
    unet = UNet2DConditionModel(**config).eval()
    controlnet = ControlNetModel.from_unet(unet).eval()
    with torch.no_grad():
        for block in list(controlnet.controlnet_down_blocks) + [controlnet.controlnet_mid_block]:
            block.weight.normal_(0, 0.02)
    pooled = config["projection_class_embeddings_input_dim"] - 6 * config["addition_time_embed_dim"]
    width_2 = pooled
    width_1 = config["cross_attention_dim"] - width_2
    encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(
        vocab_size=49408, hidden_size=width_2, intermediate_size=width_2, num_hidden_layers=2, num_attention_heads=2,
        max_position_embeddings=77, projection_dim=pooled, hidden_act="gelu")).eval()
    components = dict(unet=unet, vae=tiny_models.tiny_vae(), text_encoder=tiny_models.tiny_text_encoder(width_1),
                      text_encoder_2=encoder_2, tokenizer=tiny_models.tokenizer(),
                      tokenizer_2=tiny_models.tokenizer_2(),
                      scheduler=tiny_models.sdxl_scheduler())
    return components, controlnet


def build(size: str):
    from diffusers import ControlNetModel, DDIMScheduler, UNet2DConditionModel

    from lib_controlnet import tiny_models

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**SIZES[size]).eval()
    controlnet = ControlNetModel.from_unet(unet).eval()
    with torch.no_grad():  # ControlNet's zero convs start at zero: give them values so residuals are real work
        for block in list(controlnet.controlnet_down_blocks) + [controlnet.controlnet_mid_block]:
            block.weight.normal_(0, 0.02)
    components = dict(
        unet=unet, vae=tiny_models.tiny_vae(), text_encoder=tiny_models.tiny_text_encoder(SIZES[size]["cross_attention_dim"]),
        tokenizer=tiny_models.tokenizer(), scheduler=DDIMScheduler.from_config(tiny_models.scheduler().config, clip_sample=False),
        safety_checker=None, feature_extractor=None,
    )
    return components, controlnet


def time_pipeline(components, controlnet, hint, args, guess_mode: bool) -> float:
    from diffusers import StableDiffusionControlNetPipeline, StableDiffusionXLControlNetPipeline

    if args.sdxl:
        pipe = StableDiffusionXLControlNetPipeline(controlnet=controlnet, **components)
    else:
        pipe = StableDiffusionControlNetPipeline(controlnet=controlnet, requires_safety_checker=False, **components)
    return pipeline_steps.time_pipeline(pipe, args.steps, args.image, image=hint, guess_mode=guess_mode).per_step()


def time_adapter_pipeline(components, adapter, hint, args) -> float:
    from diffusers import StableDiffusionAdapterPipeline

    pipe = StableDiffusionAdapterPipeline(adapter=adapter, requires_safety_checker=False, **components)
    pipe.set_progress_bar_config(disable=True)
    stamps = [time.perf_counter()]
    pipe("a house", image=hint, num_inference_steps=args.steps, width=args.image, height=args.image,
         guidance_scale=7.5, generator=torch.Generator().manual_seed(0), output_type="latent",
         callback=lambda step, timestep, latents: stamps.append(time.perf_counter()))
    return pipeline_steps.median_step(stamps)


def adapter_main(args, components, controlnet, hint, hint_pil) -> None:
    """Per step: ours with a T2I-Adapter vs diffusers' adapter pipeline, and the added cost of each kind."""
    from diffusers import T2IAdapter

    torch.manual_seed(1)
    adapter = T2IAdapter(in_channels=3, channels=list(components["unet"].config.block_out_channels),
                         num_res_blocks=2, adapter_type="full_adapter").eval()
    ours_adapter, ours_controlnet = pipeline_steps.ours_copy(adapter), pipeline_steps.ours_copy(controlnet)
    results = {"pipe": [], "ours": [], "plain": [], "controlnet": []}
    for _ in range(args.repeats):
        results["pipe"].append(time_adapter_pipeline(components, adapter, hint_pil, args))
        results["ours"].append(time_ours(components, ours_adapter, hint, args, "Balanced"))
        results["plain"].append(time_ours(components, None, hint, args, "Balanced"))
        results["controlnet"].append(time_ours(components, ours_controlnet, hint, args, "Balanced"))
    step = {name: statistics.median(values) for name, values in results.items()}
    print(f"per step: adapter pipeline {step['pipe']:.3f}s, ours {step['ours']:.3f}s; plain {step['plain']:.3f}s, "
          f"ours with a ControlNet {step['controlnet']:.3f}s")
    print(f"adapter ratio            {step['ours'] / step['pipe']:.3f}  (target <= 1.00)")
    added_adapter, added_controlnet = step["ours"] - step["plain"], step["controlnet"] - step["plain"]
    print(f"added per step           adapter {added_adapter:.3f}s vs ControlNet {added_controlnet:.3f}s "
          f"({added_adapter / added_controlnet:.2f} of it)")


def time_ours(components, controlnet, hint, args, mode: str, fields: dict | None = None) -> float:
    """`controlnet` must be our own copy (pipeline_steps.ours_copy): a job switches its layers in place, and
    the peer must run the model as diffusers builds it."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    if args.sdxl:
        pipe = StableDiffusionXLPipeline(**components)
    else:
        pipe = StableDiffusionPipeline(requires_safety_checker=False, **components)
    models = [] if controlnet is None else [controlnet]  # None: a plain step, no unit
    return pipeline_steps.time_ours(pipe, models, hint, args.steps, args.image, mode, fields=fields).per_step()


def hook_overhead(components, controlnet, args) -> float:
    from lib_controlnet.control import ControlJob, Controller, PreparedUnit, RowLayout
    from lib_controlnet.hosts import diffusers as host
    from lib_controlnet.unit import ControlUnit

    unet = components["unet"]
    latent = args.image // 8
    x = torch.randn(2, 4, latent, latent)
    t = torch.tensor(500)
    context = torch.randn(2, 77, unet.config.cross_attention_dim)
    hint = torch.rand(1, 3, args.image, args.image)
    added = {}
    if args.sdxl:
        pooled = unet.config.projection_class_embeddings_input_dim - 6 * unet.config.addition_time_embed_dim
        added = dict(added_cond_kwargs=dict(text_embeds=torch.randn(2, pooled),
                                            time_ids=torch.tensor([[args.image] * 2 + [0, 0] + [args.image] * 2] * 2,
                                                                  dtype=torch.float32)))
    unit = PreparedUnit(ControlUnit(module="none", model="bench"), controlnet, hint)
    # built first: the job switches the ControlNet to its faster CPU kernels, so "alone" below runs the same ones
    controller = Controller(ControlJob(units=[unit], width=args.image, height=args.image, steps=10))
    parts, hooked = [], []
    with torch.no_grad():
        for _ in range(args.repeats + 1):  # the first round warms up
            start = time.perf_counter()
            unet(x, t, context, **added)
            middle = time.perf_counter()
            controlnet(x, t, context, controlnet_cond=hint.expand(2, -1, -1, -1), **added)
            parts.append(time.perf_counter() - start)
            with host.hooked(unet, controller):
                controller.begin_step(0, 10, RowLayout.diffusers_cfg(1))
                start = time.perf_counter()
                unet(x, t, context, **added)
                hooked.append(time.perf_counter() - start)
            del middle
    # the hooked step reuses the job's hint embedding after its first call, as in a real job
    return statistics.median(hooked[1:]) / statistics.median(parts[1:])


def controlnet_main(args, components, controlnet, hint, hint_pil) -> None:
    """The three ratios of the module docstring for one ControlNet."""
    ours_controlnet = pipeline_steps.ours_copy(controlnet)  # the pipeline keeps the untouched model
    overhead = hook_overhead(components, ours_controlnet, args)
    results = {"pipe": [], "ours": [], "pipe_guess": [], "ours_control": []}
    for _ in range(args.repeats):
        results["pipe"].append(time_pipeline(components, controlnet, hint_pil, args, guess_mode=False))
        results["ours"].append(time_ours(components, ours_controlnet, hint, args, "Balanced"))
        results["pipe_guess"].append(time_pipeline(components, controlnet, hint_pil, args, guess_mode=True))
        results["ours_control"].append(time_ours(components, ours_controlnet, hint, args,
                                                 "ControlNet is more important"))
    step = {name: statistics.median(values) for name, values in results.items()}
    print(f"per step: pipeline {step['pipe']:.3f}s, ours {step['ours']:.3f}s; guess_mode {step['pipe_guess']:.3f}s, "
          f"ours (ControlNet is more important) {step['ours_control']:.3f}s")
    print(f"hook overhead ratio      {overhead:.3f}  (target <= 1.02)")
    print(f"balanced ratio           {step['ours'] / step['pipe']:.3f}  (target <= 0.95)")
    print(f"cn-important ratio       {step['ours_control'] / step['pipe_guess']:.3f}  (target <= 1.00)")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="mid-size model instead of SD1.5 size")
    parser.add_argument("--image", type=int, default=256, help="image side in pixels (latent = image / 8)")
    parser.add_argument("--steps", type=int, default=4, help="sampling steps per run (the first is warm-up)")
    parser.add_argument("--repeats", type=int, default=None, help="interleaved rounds (default 3)")
    parser.add_argument("--adapter", action="store_true", help="benchmark a T2I-Adapter instead of a ControlNet")
    parser.add_argument("--ip-adapter", action="store_true", help="benchmark one IP-Adapter plus unit")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    parser.add_argument("--sdxl", action="store_true", help="SDXL-shaped UNet + ControlNet, SDXL pipelines")
    parser.add_argument("--lllite", action="store_true",
                        help="with --sdxl: ControlNet-LLLite instead (benchmarks/_lllite.py)")
    parser.add_argument("--control-lora", action="store_true",
                        help="with --sdxl: a Control-LoRA's merge cost instead (benchmarks/_control_lora.py)")
    parser.add_argument("--union", action="store_true", help="an SDXL ControlNet-Union (implies --sdxl)")
    parser.add_argument("--reference", action="store_true", help="benchmark reference units (SD1.5-shaped)")
    parser.add_argument("--reference-peer", help="a local copy of diffusers' community stable_diffusion_reference.py")
    args = parser.parse_args(argv)
    args.sdxl = args.sdxl or args.union
    args.repeats = args.repeats or 3
    for flag, kind in (("control_lora", "Control-LoRA"), ("lllite", "ControlNet-LLLite")):
        if getattr(args, flag) and not args.sdxl:
            parser.error(f"--{flag.replace('_', '-')} needs --sdxl: {kind} models are for SDXL")
    if args.threads:
        torch.set_num_threads(args.threads)
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.disable_progress_bar()
    size = ("sdxl-quick" if args.quick else "sdxl") if args.sdxl else ("quick" if args.quick else "sd15")
    started = time.perf_counter()
    components, controlnet = build_sdxl(args.quick) if args.sdxl else build(size)
    rng = np.random.RandomState(0)
    hint = (rng.rand(args.image, args.image, 3) > 0.9).astype(np.uint8) * 255
    from PIL import Image

    hint_pil = Image.fromarray(hint)
    print(f"model: {size} (UNet {sum(p.numel() for p in components['unet'].parameters()) / 1e6:.0f}M, ControlNet "
          f"{sum(p.numel() for p in controlnet.parameters()) / 1e6:.0f}M params), image {args.image}x{args.image}, "
          f"{args.steps} steps x {args.repeats} rounds, {torch.get_num_threads()} threads")
    if args.control_lora:
        from benchmarks import _control_lora

        _control_lora.run(args, components, controlnet)
    elif args.lllite:
        from benchmarks import _lllite

        _lllite.run(args, components, controlnet)
    elif args.ip_adapter:
        from benchmarks._ip_adapter_steps import ip_adapter_main

        ip_adapter_main(args, components)
    elif args.union:
        from benchmarks import _union

        _union.run(args, components, controlnet, hint, hint_pil)
    elif args.reference:
        from benchmarks._reference_steps import reference_main

        reference_main(args, components, hint, hint_pil)
    elif args.adapter:
        adapter_main(args, components, controlnet, hint, hint_pil)
    else:
        controlnet_main(args, components, controlnet, hint, hint_pil)
    print(f"total {time.perf_counter() - started:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
