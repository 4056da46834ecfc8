"""bench_hook.py --reference: per-step cost of a reference unit (reference_only, reference_adain+attn).

A reference unit runs the UNet twice per step by design (the reference pass, then the real pass), so its step
is measured against a plain step and the ratio reported beside 2x. The peer is diffusers' community
StableDiffusionReferencePipeline (examples/community/stable_diffusion_reference.py; not in the diffusers
package): give a local copy of the file with --reference-peer, e.g. from a diffusers checkout at the installed
version: `git show v0.31.0:examples/community/stable_diffusion_reference.py > stable_diffusion_reference.py`.
It replaces the UNet's forwards in place, so it gets its own copy of the UNet.
"""
from __future__ import annotations

import copy
import importlib.util
import statistics
import time
from pathlib import Path

import torch

from benchmarks import _pipeline_steps as pipeline_steps

MODES = {"reference_only": dict(reference_attn=True, reference_adain=False),
         "reference_adain+attn": dict(reference_attn=True, reference_adain=True)}


def load_peer(path):
    """The community pipeline class from a local file, or (None, why not)."""
    if not path:
        return None, "no --reference-peer file given"
    path = Path(path)
    if not path.is_file():
        return None, f"{path} is not a file"
    spec = importlib.util.spec_from_file_location("stable_diffusion_reference", path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
        return module.StableDiffusionReferencePipeline, None
    except Exception as error:  # an incompatible copy: report it, run our side anyway
        return None, f"{path.name} does not import with this diffusers: {error}"


def time_ours(components, hint, args, module=None) -> float:
    from diffusers import StableDiffusionPipeline

    from lib_controlnet.generate import GenerateRequest, generate
    from lib_controlnet.unit import ControlUnit

    pipe = StableDiffusionPipeline(requires_safety_checker=False, **components)
    clock = pipeline_steps.StepClock(False)
    units = [] if module is None else [ControlUnit(module=module, image=hint)]
    generate(GenerateRequest(base="", prompt="a house", units=units, steps=args.steps, width=args.image,
                             height=args.image, on_step_end=lambda step: clock.tick()), pipe=pipe)
    return clock.per_step()


def time_peer(peer_class, components, hint_pil, args, module) -> float:
    pipe = peer_class(requires_safety_checker=False, **components)
    pipe.set_progress_bar_config(disable=True)
    stamps = [time.perf_counter()]
    pipe("a house", ref_image=hint_pil, num_inference_steps=args.steps, width=args.image, height=args.image,
         guidance_scale=7.5, generator=torch.Generator().manual_seed(0), output_type="latent",
         callback=lambda step, timestep, latents: stamps.append(time.perf_counter()), **MODES[module])
    return pipeline_steps.median_step(stamps)


def hook_ratio(components, args, module: str) -> float:
    """One UNet call (CFG batch of 2) with a reference unit / one plain call, interleaved. 2.0 is the two passes;
    above it: attn1 reading twice the tokens and, at style fidelity > 0, attn1 again on the unconditional rows."""
    from lib_controlnet.control import ControlJob, Controller, PreparedUnit, RowLayout
    from lib_controlnet.hosts import diffusers as host
    from lib_controlnet.reference import ReferenceModel
    from lib_controlnet.unit import ControlUnit

    unet = components["unet"]
    latent = args.image // 8
    x, t = torch.randn(2, 4, latent, latent), torch.tensor(500)
    context = torch.randn(2, 77, unet.config.cross_attention_dim)
    hint = torch.rand(1, 3, args.image, args.image)
    unit = PreparedUnit(ControlUnit(module=module), ReferenceModel(module), hint)
    controller = Controller(ControlJob(units=[unit], width=args.image, height=args.image, steps=10,
                                       encode_latent=host.vae_encoder(components["vae"]),
                                       alphas_cumprod=components["scheduler"].alphas_cumprod))
    # One torch thread: the work runs on this thread, so its CPU time is what the call costs, whatever else the
    # machine runs (wall time on a shared machine swings by tens of percent); otherwise wall time.
    clock = time.thread_time if torch.get_num_threads() == 1 else time.perf_counter
    plain, hooked = [], []
    with torch.no_grad():
        for _ in range(args.repeats * 2 + 1):  # the first round warms up (and encodes the reference once)
            start = clock()
            unet(x, t, context)
            plain.append(clock() - start)
            with host.hooked(unet, controller):
                controller.begin_step(0, 10, RowLayout.diffusers_cfg(1))
                start = clock()
                unet(x, t, context)
                hooked.append(clock() - start)
    return statistics.median(hooked[1:]) / statistics.median(plain[1:])


def reference_main(args, components, hint, hint_pil) -> None:
    kind = "CPU time" if torch.get_num_threads() == 1 else "wall time"
    for module in MODES:
        print(f"{module + ' UNet call / plain call':34s} {hook_ratio(components, args, module):.3f}  "
              f"({kind}; two UNet passes by design: 2.00)")
    peer_class, why_not = load_peer(args.reference_peer)
    peer_components = dict(components, unet=copy.deepcopy(components["unet"]))
    results = {"plain": []}
    for module in MODES:
        results[module] = []
        if peer_class is not None:
            results[f"peer {module}"] = []
    for _ in range(args.repeats):  # interleaved, so a busy spell of the machine falls on every variant alike
        results["plain"].append(time_ours(components, hint, args))
        for module in MODES:
            results[module].append(time_ours(components, hint, args, module))
            if peer_class is not None:
                results[f"peer {module}"].append(time_peer(peer_class, peer_components, hint_pil, args, module))
    step = {name: statistics.median(values) for name, values in results.items()}
    print("per step: " + ", ".join(f"{name} {value:.3f}s" for name, value in step.items()))
    for module in MODES:
        print(f"{module + ' / plain':34s} {step[module] / step['plain']:.3f}  (two UNet passes by design: 2.00)")
        if peer_class is not None:
            print(f"{module + ' / community pipeline':34s} {step[module] / step[f'peer {module}']:.3f}  "
                  "(target <= 1.00)")
    if peer_class is None:
        print(f"community StableDiffusionReferencePipeline not run: {why_not}")
