"""Per-step time (and peak GPU memory) of one sampling run: diffusers' pipelines as they come, and ours
(lib_controlnet.generate: diffusers' plain pipeline with our diffusers host). Shared by bench_hook.py and
gpu_suite.py.

A run's per-step time is the median gap between consecutive step-end callbacks, leaving out the first step
(warm-up). On a GPU each callback drains the queue first, so the gaps are the steps' real durations; the peak
memory counter is reset at the first step's end and read at each later one, so it covers the steps alone
(not the text encoding before them nor the VAE decode after them).
"""
from __future__ import annotations

import copy
import statistics
import time
from typing import Callable, Optional

import numpy as np
import torch


class StepClock:
    """Step-end timestamps (and peak memory over the steps when `cuda`)."""

    def __init__(self, cuda: bool = False):
        self.cuda = cuda
        self.stamps = [time.perf_counter()]
        self.peak: Optional[int] = None

    def tick(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()
            if len(self.stamps) == 1:
                torch.cuda.reset_peak_memory_stats()
                self.peak = 0
            else:
                self.peak = max(self.peak, torch.cuda.max_memory_allocated())
        self.stamps.append(time.perf_counter())

    def per_step(self) -> float:
        steps = np.diff(self.stamps)[1:]
        return float(statistics.median(steps))

    @property
    def peak_gb(self) -> Optional[float]:
        return None if self.peak is None else self.peak / 2**30


def ours_copy(model):
    """The model for our side: a job switches its layers' classes and attention processors in place (never a
    weight), while the peer must run the model as diffusers builds it. The copy shares the weights, so an
    SDXL-size run holds one ControlNet, not two."""
    return copy.deepcopy(model, memo={id(p): p for p in model.parameters()})


def median_step(times: list[float]) -> float:
    """Per-step time from the callback timestamps, leaving out the first (warm-up) step."""
    return float(statistics.median(np.diff(times)[1:]))


def time_pipeline(pipe, steps: int, size: int, cuda: bool = False, prompt: str = "a house", **call) -> StepClock:
    """One run of a diffusers pipeline (with or without ControlNet: `call` holds image=, guess_mode=, ...)."""
    pipe.set_progress_bar_config(disable=True)
    clock = StepClock(cuda)

    def stamp(pipeline, step, timestep, kwargs):
        clock.tick()
        return kwargs

    pipe(prompt, num_inference_steps=steps, width=size, height=size, guidance_scale=7.5,
         generator=torch.Generator().manual_seed(0), callback_on_step_end=stamp, output_type="latent", **call)
    return clock


def time_ours(pipe, models: list, hint, steps: int, size: int, mode: str = "Balanced", device="cpu",
              dtype=torch.float32, cuda: bool = False, fields: Optional[dict] = None) -> StepClock:
    """One run of our generate() with one unit per model in `models` (all on the same hint). The models must
    be ours to change: a job switches their convolutions to the faster CPU kernel in place (on a GPU that
    switch does nothing). `fields`: more ControlUnit fields for every unit (a union model's control type)."""
    from lib_controlnet.generate import GenerateRequest, generate
    from lib_controlnet.unit import ControlUnit

    clock = StepClock(cuda)
    by_name = {f"bench{i}": model for i, model in enumerate(models)}
    request = GenerateRequest(
        base="", prompt="a house",
        units=[ControlUnit(module="none", model=name, image=hint, control_mode=mode, **(fields or {}))
               for name in by_name],
        steps=steps, width=size, height=size, device=str(device), dtype=dtype, load_model=by_name.__getitem__,
        on_step_end=lambda step: clock.tick())
    generate(request, pipe=pipe)
    return clock


def interleaved(variants: dict[str, Callable[[], object]], rounds: int, expired: Callable[[], bool]) -> dict:
    """Run every variant once per round, in turn, until `rounds` or `expired()`; {name: [results]}."""
    results = {name: [] for name in variants}
    for _ in range(rounds):
        for name, run in variants.items():
            if expired():
                return results
            results[name].append(run())
    return results
