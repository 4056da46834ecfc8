"""bench_hook.py --ip-adapter: per step, our generate() with one IP-Adapter plus unit vs diffusers'
StableDiffusionPipeline with the same adapter loaded by its own `_load_ip_adapter_weights`.

The adapter has SD1.5 plus's shape at the benchmarked UNet's widths (16 tokens, a 4-block resampler); the CLIP
tower is small (it runs once per job on our side and once per call on theirs, outside the per-step loop: the
pipeline is handed the same `ip_adapter_image_embeds`). One UNet serves both sides (two SD1.5 UNets would not
fit this machine's memory): the pipeline's runs switch its attention processors to diffusers' IP-Adapter ones
and back, ours run on the plain processors with our hooks.
"""
from __future__ import annotations

import statistics
import tempfile
from pathlib import Path

import torch

from benchmarks import _pipeline_steps as pipeline_steps

ENCODER_WIDTH = 64  # the tiny tower's hidden width = the resampler's input width


def _diffusers_ip(unet, state):
    """Load the adapter the diffusers way, then hand back two switches: (to theirs, to plain)."""
    plain = dict(unet.attn_processors)
    unet._load_ip_adapter_weights([state])
    theirs, projection = dict(unet.attn_processors), unet.encoder_hid_proj

    def use_theirs():  # the resampler's attentions count among the UNet's processors: projection first
        unet.encoder_hid_proj = projection
        unet.set_attn_processor(dict(theirs))
        unet.register_to_config(encoder_hid_dim_type="ip_image_proj")

    def use_plain():
        unet.encoder_hid_proj = None
        unet.set_attn_processor(dict(plain))
        unet.register_to_config(encoder_hid_dim_type=None)

    use_plain()
    return use_theirs, use_plain


def ip_adapter_main(args, components) -> None:
    from annotators import clip_vision
    from diffusers import StableDiffusionPipeline
    from lib_controlnet import tiny_models
    from lib_controlnet.generate import GenerateRequest, generate
    from lib_controlnet.models.kinds import load_control_model
    from lib_controlnet.settings import update_settings
    from lib_controlnet.unit import ControlUnit

    unet = components["unet"]
    folder = Path(tempfile.mkdtemp(prefix="bench-ip-"))
    update_settings(annotator_models_path=folder)
    clip_vision.random_encoder_file(folder, "clip_h", hidden_size=ENCODER_WIDTH, projection_dim=32)
    state = tiny_models.random_ip_adapter_state(unet, "plus", embed_dim=ENCODER_WIDTH, tokens=16, hidden_dims=64 * 12)
    torch.save(state, folder / "ip-adapter-plus_sd15.bin")
    adapter = load_control_model(folder / "ip-adapter-plus_sd15.bin")
    image = (torch.rand(args.image, args.image, 3) * 255).to(torch.uint8).numpy()
    with torch.no_grad():
        cond, uncond = clip_vision.encode(clip_vision.get_encoder("clip_h"), [image], hidden_states=True)
    embeds = [torch.cat([uncond, cond]).unsqueeze(1)]  # (uncond, cond) rows, as the pipeline's CFG expects
    use_theirs, use_plain = _diffusers_ip(unet, state)
    pipe = StableDiffusionPipeline(requires_safety_checker=False, **components)

    def theirs():
        use_theirs()
        try:
            return pipeline_steps.time_pipeline(pipe, args.steps, args.image, ip_adapter_image_embeds=embeds).per_step()
        finally:
            use_plain()

    def ours(with_unit: bool = True):
        clock = pipeline_steps.StepClock()
        units = [ControlUnit(module="ip-adapter_clip_h", model="ipa", image=image)] if with_unit else []
        generate(GenerateRequest(base="", prompt="a house", units=units, steps=args.steps, width=args.image,
                                 height=args.image, load_model=lambda name: adapter,
                                 on_step_end=lambda step: clock.tick()), pipe=pipe)
        return clock.per_step()

    results = {"pipe": [], "ours": [], "plain": []}
    for _ in range(args.repeats):
        results["pipe"].append(theirs())
        results["ours"].append(ours())
        results["plain"].append(ours(with_unit=False))
    step = {name: statistics.median(values) for name, values in results.items()}
    print(f"per step: IP-Adapter pipeline {step['pipe']:.3f}s, ours {step['ours']:.3f}s; plain {step['plain']:.3f}s")
    print(f"ip-adapter ratio         {step['ours'] / step['pipe']:.3f}  (target <= 1.00)")
    print(f"added per step           ours {step['ours'] - step['plain']:.3f}s, "
          f"diffusers' {step['pipe'] - step['plain']:.3f}s")
