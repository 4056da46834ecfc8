"""bench_hook.py --union: per step, an SDXL ControlNet-Union (ProMax, 8 types) in our generate() against diffusers'
StableDiffusionXLControlNetPipeline with the plain ControlNet holding the same weights (the pinned diffusers 0.31 has
no union pipeline; the union parts are its small extra work), and against our own plain-ControlNet path.
"""
from __future__ import annotations

import copy
import statistics

from benchmarks import _pipeline_steps, bench_hook


def run(args, components, controlnet, hint, hint_pil) -> None:
    """Per step: ours with a union model (one Hard Edge condition) vs diffusers' SDXL ControlNet pipeline with the
    plain ControlNet that holds the same weights (the union's own parts are its small extra work)."""
    from lib_controlnet import tiny_models

    union = tiny_models.union_from_controlnet(copy.deepcopy(controlnet))
    extra = sum(p.numel() for n, p in union.named_parameters() if n.startswith((
        "task_embedding", "transformer_layes.", "spatial_ch_projs.", "control_add_embedding.")))
    print(f"union parts: {extra / 1e6:.2f}M params on top of the ControlNet's")
    ours_controlnet = _pipeline_steps.ours_copy(controlnet)  # the pipeline keeps the untouched model
    results = {"pipe": [], "ours": [], "ours_controlnet": []}
    for _ in range(args.repeats):
        results["pipe"].append(bench_hook.time_pipeline(components, controlnet, hint_pil, args, guess_mode=False))
        results["ours"].append(bench_hook.time_ours(components, union, hint, args, "Balanced",
                                                    fields={"union_control_type": "Hard Edge"}))
        results["ours_controlnet"].append(bench_hook.time_ours(components, ours_controlnet, hint, args, "Balanced"))
    step = {name: statistics.median(values) for name, values in results.items()}
    print(f"per step: SDXL ControlNet pipeline {step['pipe']:.3f}s, ours with the union model {step['ours']:.3f}s, "
          f"ours with the plain ControlNet {step['ours_controlnet']:.3f}s")
    print(f"union ratio              {step['ours'] / step['pipe']:.3f}  (target <= 1.00)")
    print(f"union / our ControlNet   {step['ours'] / step['ours_controlnet']:.3f}  (the union parts' own cost)")
