"""GPU suite, sampling sections: per-step time and peak memory of SD1.5 (512 px) or SDXL (1024 px), plain and
with 1 or 3 ControlNets (Balanced / "ControlNet is more important"), through our diffusers host against
diffusers' ControlNet pipelines, and through our ldm host on the WebUI's own ldm UNetModel.

Pipelines are timed per step from their step-end callbacks (benchmarks/_pipeline_steps.py); the ldm UNet as
the WebUI's sampler calls it: one call per step on the cond + uncond rows (cond first), under autocast as the
WebUI runs it. Variants alternate, one run each per round, so a slow moment hits all alike.
"""
from __future__ import annotations

import contextlib

import numpy as np
import torch

from benchmarks import _pipeline_steps as steps_mod
from benchmarks import _sd_models as models
from benchmarks._suite import Row, median, ratio

BALANCED, CN_MORE = "Balanced", "ControlNet is more important"
CASES = [(1, BALANCED), (1, CN_MORE), (3, BALANCED), (3, CN_MORE)]
LABEL = {"sd15": "SD1.5", "sdxl": "SDXL"}


def _case_name(units: int, mode: str) -> str:
    return f"{units} unit{'s' if units > 1 else ''}, {mode}"


def _pipelines(family: str, parts: dict, controlnets: list):
    from diffusers import (StableDiffusionControlNetPipeline, StableDiffusionPipeline,
                           StableDiffusionXLControlNetPipeline, StableDiffusionXLPipeline)

    if family == "sdxl":
        plain_cls, control_cls, extra = StableDiffusionXLPipeline, StableDiffusionXLControlNetPipeline, {}
    else:
        plain_cls, control_cls = StableDiffusionPipeline, StableDiffusionControlNetPipeline
        extra = dict(requires_safety_checker=False)
    plain = plain_cls(**parts, **extra)
    single = control_cls(controlnet=controlnets[0], **parts, **extra)
    multi = control_cls(controlnet=controlnets, **parts, **extra)  # a list: diffusers' MultiControlNetModel
    return plain, single, multi


class _LdmJob:
    """A WebUI-style job on the ldm UNet: hooks installed once, `steps` calls, hooks removed."""

    def __init__(self, ldm, inputs: dict, controlnets: list, mode, size: int, ctx):
        self.ldm, self.inputs, self.controlnets, self.mode, self.size, self.ctx = ldm, inputs, controlnets, mode, \
            size, ctx

    def _call(self):
        # the WebUI samples under autocast: ldm's timestep embedding comes out fp32 for fp16 layers
        autocast = torch.autocast(self.ctx.device.type, dtype=torch.float16) if self.ctx.dtype == torch.float16 \
            else contextlib.nullcontext()
        with torch.no_grad(), autocast:
            self.ldm(self.inputs["x"], timesteps=self.inputs["t"], context=self.inputs["context"],
                     y=self.inputs["y"])

    def __call__(self, n_steps: int) -> steps_mod.StepClock:
        from lib_controlnet.control import ControlJob, Controller, PreparedUnit, RowLayout
        from lib_controlnet.hosts import ldm as host
        from lib_controlnet.unit import ControlUnit

        clock = steps_mod.StepClock(self.ctx.dev.cuda)
        if not self.controlnets:
            for _ in range(n_steps):
                self._call()
                clock.tick()
            return clock
        units = [PreparedUnit(ControlUnit(module="none", model=f"bench{i}", control_mode=self.mode), model,
                              self.inputs["hint"]) for i, model in enumerate(self.controlnets)]
        controller = Controller(ControlJob(units=units, width=self.size, height=self.size, steps=n_steps,
                                           device=self.ctx.device, dtype=self.ctx.dtype))
        with host.hooked(self.ldm, controller):
            for step in range(n_steps):
                controller.begin_step(step, n_steps, RowLayout.webui_cfg([1]))
                self._call()
                clock.tick()
        return clock


def _ldm_inputs(family: str, tiny: bool, size: int, ctx) -> dict:
    cfg = models.unet_config(family, tiny)
    latent = size // 8
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, latent, latent, generator=generator)
    context = torch.randn(2, 77, cfg["cross_attention_dim"], generator=generator)
    y = None
    if family == "sdxl":
        y = torch.randn(2, cfg["projection_class_embeddings_input_dim"], generator=generator)
    to = dict(device=ctx.device, dtype=ctx.dtype)
    return dict(x=x.to(**to), t=torch.full((2,), 500.0, device=ctx.device), context=context.to(**to),
                y=None if y is None else y.to(**to), hint=torch.rand(1, 3, size, size, generator=generator))


def sampling_section(family: str):
    def run(ctx, deadline) -> list[Row]:
        from PIL import Image

        section = f"{LABEL[family]} sampling"
        tiny, device, dtype, cuda = ctx.tiny, ctx.device, ctx.dtype, ctx.dev.cuda
        size = models.IMAGE_SIZE[(family, tiny)]
        n_steps = 3 if tiny else 10  # the first step is warm-up: tiny runs time two
        rounds = 1 if tiny else 3
        unet = models.unet(family, tiny, device, dtype)
        controlnets = [models.controlnet(family, tiny, device, dtype, seed=1 + i) for i in range(3)]
        # a job switches its models' layer classes and attention processors in place: the peer keeps its own
        ours_controlnets = [steps_mod.ours_copy(m) for m in controlnets]
        parts = models.pipeline_parts(family, tiny, unet, device, dtype)
        plain, single, multi = _pipelines(family, parts, controlnets)
        hint = (np.random.RandomState(0).rand(size, size, 3) > 0.9).astype(np.uint8) * 255
        hint_pil = Image.fromarray(hint)
        ldm = models.ldm_unet(family, tiny, device, dtype)
        inputs = _ldm_inputs(family, tiny, size, ctx)

        variants = {"plain": lambda: steps_mod.time_pipeline(plain, n_steps, size, cuda),
                    "ldm plain": lambda: _LdmJob(ldm, inputs, [], BALANCED, size, ctx)(n_steps)}
        for units, mode in CASES:
            guess = mode == CN_MORE
            peer_pipe, image = (single, hint_pil) if units == 1 else (multi, [hint_pil] * units)
            variants[("ours", units, mode)] = (
                lambda u=units, m=mode: steps_mod.time_ours(plain, ours_controlnets[:u], hint, n_steps, size, m,
                                                            device, dtype, cuda))
            variants[("peer", units, mode)] = (
                lambda p=peer_pipe, i=image, g=guess: steps_mod.time_pipeline(p, n_steps, size, cuda, image=i,
                                                                              guess_mode=g))
            variants[("ldm", units, mode)] = (
                lambda u=units, m=mode: _LdmJob(ldm, inputs, ours_controlnets[:u], m, size, ctx)(n_steps))
        results = steps_mod.interleaved(variants, rounds, deadline.expired)
        per_step = {k: median(c.per_step() for c in v) for k, v in results.items()}
        peak = {k: max((c.peak_gb for c in v if c.peak_gb is not None), default=None) for k, v in results.items()}
        count = {k: len(v) * (n_steps - 1) for k, v in results.items()}  # gaps after the first

        def row(item, key, peer_key=None, peer_name="", note=""):
            if per_step[key] is None:
                return Row(section, item, status=f"not measured: the section's {deadline.limit:.0f} s ran out")
            peer = per_step.get(peer_key) if peer_key else None
            return Row(section, item, "s/step", per_step[key], peer, peer_name if peer is not None else "",
                       ratio(per_step[key], peer), "lower", peak[key], peak.get(peer_key), count[key], note=note)

        pipe_name = "diffusers " + ("SDXL " if family == "sdxl" else "") + "ControlNet pipeline"
        rows = [row(f"plain UNet, {size} px, fp16" if not tiny else f"plain UNet, {size} px (tiny)", "plain",
                    note="diffusers pipeline, no ControlNet: the baseline")]
        for units, mode in CASES:
            rows.append(row(f"diffusers host, {_case_name(units, mode)}", ("ours", units, mode), ("peer", units, mode),
                            pipe_name + (" guess_mode" if mode == CN_MORE else ""),
                            note="ours = lib_controlnet.generate (plain pipeline + our hook)"))
        rows.append(row("ldm UNetModel, plain", "ldm plain", note="the WebUI's UNet class, one call per step"))
        for units, mode in CASES:
            rows.append(row(f"ldm host, {_case_name(units, mode)}", ("ldm", units, mode), "ldm plain",
                            "ldm UNetModel alone", note="ratio = cost of the control over the plain step"))
        return rows

    return run
