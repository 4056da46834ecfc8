"""ControlNet control for the WebUI's UNet: ldm's `UNetModel` (SD1/SD2) and sgm's (SDXL, same layout plus `y`).

Module hooks only, never a replaced `forward`, so other extensions that wrap the UNet keep working:
- a forward pre-hook on the UNet reads x, timesteps, context and y and asks the Controller for residuals;
- a forward pre-hook on each `output_blocks[j]` adds residual k to the skip half of its input. The decoder
  feeds `cat([h, hs.pop()])` to output block j, and the popped skip is input block k = n-1-j's output; adding
  there, and not to input block k's own output, keeps the encoder's path untouched, as ControlNet defines;
- a forward hook on `middle_block` adds the last residual to its output;
- ATTENTION kinds (LLLite) put forward pre-hooks on the attention layers they condition (`Controller.attach`);
- a forward hook on each `input_blocks[k]` adds T2I-Adapter features to its output (so both the next block and
  the skip see them, as TencentARC's adapter does): feature i goes to the last block of the first run of
  blocks, after feature i-1's block, whose output has the feature's channels and resolution. That is where
  diffusers' UNet adds `down_intrablock_additional_residuals` (SD1.5: blocks 2, 5, 8, 11; SDXL: 3, 5, 8, and
  the 4th onto the middle block's output).
- reference units (lib_controlnet.reference): in the UNet pre-hook, the plain UNet first runs on the noised
  reference to record; hooks on each transformer block's attn1 and on the AdaIN blocks record and read.
All hooks go away when the `hooked` block ends: after success, an exception, or the user's Interrupt.

How the WebUI layer drives it, per job:
    controller = Controller(ControlJob(units, width, height, steps, hires_fix=p.enable_hr, device=..., dtype=...))
    installed = install(unet, controller)          # in process(); `installed.remove()` in postprocess()
    each step (on_cfg_denoiser): controller.begin_step(params.sampling_step, params.total_sampling_steps,
                                                      RowLayout.webui_cfg(repeats, skip_uncond, is_edit_model))
    hires-fix pass: controller.set_pass(True, hr_width, hr_height, steps=hr_steps)
SDXL: sgm's UNetModel has the same input_blocks / middle_block / output_blocks and passes `y`, so the same hooks
serve it. (sgm cannot be installed here; tests build its SDXL layout on the ldm class with label_emb as sgm's
num_classes="sequential" Sequential(Sequential(Linear, SiLU, Linear)) and feed it `y`.)
"""
from __future__ import annotations

import contextlib
import math
from typing import Iterator, Optional

import torch

from lib_controlnet.control import ControlError, Controller, Residuals, UNetCall
from lib_controlnet.models.kinds import RESIDUALS
from lib_controlnet.models.kinds.base_unet import ldm_modules
from lib_controlnet.models.kinds import REFERENCE
from lib_controlnet import reference


class _State:
    residuals: Optional[Residuals] = None
    encoder: dict = {}  # input block index -> feature to add to its output, for the current call
    attention: Optional[dict] = None  # id(unit) -> AttentionCall of each ATTENTION unit, for the current call
    reference = None  # lib_controlnet.reference.ReferenceHooks when the job has reference units


def block_levels(unet) -> list[tuple[int, int]]:
    """(output channels, times downsampled) of each input block, read from its layers: a layer with `op` is a
    Downsample, and convolutions, ResBlocks and Downsamples carry `out_channels` (transformers keep them)."""
    levels, channels, level = [], None, 0
    for block in unet.input_blocks:
        for layer in block:
            if hasattr(layer, "op"):
                level += 1
            channels = getattr(layer, "out_channels", channels)
        levels.append((channels, level))
    return levels


MIDDLE = "middle"


def encoder_targets(levels: list[tuple[int, int]], features: list[torch.Tensor], latent_height: int) -> dict:
    """{input block index, or MIDDLE: feature} for adapter features in the UNet's order. A feature left over
    when the encoder has no further block of its shape goes onto the middle block's output (SDXL's 4th)."""
    targets: dict = {}
    start = 0
    for i, feature in enumerate(features):
        wanted = (feature.shape[1], round(math.log2(latent_height / feature.shape[-2])))
        first = next((k for k in range(start, len(levels)) if levels[k] == wanted), None)
        if first is None and i == len(features) - 1 and levels[-1] == wanted and MIDDLE not in targets:
            targets[MIDDLE] = feature
            continue
        if first is None:
            raise ControlError(f"A T2I-Adapter feature with {wanted[0]} channels at 1/{2 ** wanted[1]} of the latent "
                               "size fits no block of this UNet: the adapter was made for another base model.")
        last = first
        while last + 1 < len(levels) and levels[last + 1] == wanted:
            last += 1
        targets[last] = feature
        start = last + 1
    return targets


def _unet_pre_hook(controller: Controller, state: _State, levels: list):
    def hook(module, args, kwargs):
        def arg(name, index):
            if name in kwargs:
                return kwargs[name]
            return args[index] if len(args) > index else None

        state.residuals, state.encoder = None, {}  # never let a failed call's control leak into the next one
        state.attention = None
        sample = arg("x", 0)
        call = UNetCall(sample=sample, timestep=arg("timesteps", 1), context=arg("context", 2), y=arg("y", 3))
        if state.reference is not None:
            passes, rows = controller.reference_passes(call)
            extra = {} if call.y is None else {"y": call.y}
            state.reference.run(passes, rows, lambda reference: module.forward(
                reference, call.timestep, context=call.context, **extra))
        residuals = controller.residuals(call)
        if residuals is not None and residuals.encoder is not None:
            state.encoder = encoder_targets(levels, residuals.encoder, sample.shape[-2])
        state.residuals = residuals if residuals is not None and residuals.down is not None else None
        state.attention = residuals.attention if residuals is not None else None
        return None

    return hook


def _unet_post_hook(state: _State):
    def hook(module, args, kwargs, output):
        state.residuals, state.encoder = None, {}
        state.attention = None
        if state.reference is not None:
            state.reference.reset()  # the records are this call's only
        return None

    return hook


def _skip_hook(state: _State, index: int):
    def hook(module, args):
        if state.residuals is None:
            return None
        residual = state.residuals.down[index]
        h = args[0]
        channels = residual.shape[1]
        residual = residual.to(h.dtype)
        if torch.is_grad_enabled() and (h.requires_grad or residual.requires_grad):
            h = torch.cat([h[:, :-channels], h[:, -channels:] + residual], dim=1)
        else:
            h[:, -channels:] += residual  # the concatenation is fresh and only this block reads it
        return (h, *args[1:])

    return hook


def _encoder_hook(state: _State, index: int):
    def hook(module, args, output):
        feature = state.encoder.get(index)
        if feature is None:
            return None
        return output + feature.to(output.dtype)

    return hook


def _middle_hook(state: _State):
    def hook(module, args, output):
        if state.residuals is not None:
            output = output + state.residuals.mid.to(output.dtype)
        feature = state.encoder.get(MIDDLE)
        if feature is not None:
            output = output + feature.to(output.dtype)
        return output

    return hook


def reference_hooks(unet) -> "reference.ReferenceHooks":
    """The reference units' hook points on an ldm/sgm UNet: every transformer block's attn1 that attends to
    itself, and the blocks whose outputs AdaIN renormalises."""
    blocks = [m for part in (unet.input_blocks, unet.middle_block, unet.output_blocks) for m in part.modules()
              if hasattr(m, "attn1") and hasattr(m, "norm1")]
    attention = [(block.attn1, weight) for block, weight in zip(blocks, reference.attention_weights(blocks))
                 if not getattr(block, "disable_self_attn", False)]
    adain = reference.adain_layers(unet.middle_block, dict(enumerate(unet.input_blocks)),
                                   dict(enumerate(unet.output_blocks)), len(unet.input_blocks))
    return reference.ReferenceHooks(attention, adain, context_kwarg="context")


class Installed:
    """Our hooks on one UNet. `remove()` is idempotent; prefer the `hooked` context manager where the job is one
    block of code. The WebUI's Script lifecycle spreads a job over callbacks, so it installs in `process` and
    removes in `postprocess`, and `install` first removes whatever an earlier job that died left behind."""

    def __init__(self, unet, controller: Controller, handles: list, state: _State):
        self.unet, self.controller, self._handles, self._state = unet, controller, handles, state

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._state.residuals, self._state.encoder = None, {}
        self._state.attention = None
        _installed.pop(id(self.unet), None)
        self.controller.close()


_installed: dict[int, Installed] = {}


def install(unet, controller: Controller) -> Installed:
    """Hook `controller` into the ldm/sgm `unet` until `.remove()`."""
    stale = _installed.get(id(unet))
    if stale is not None:
        stale.remove()
    controller.bind_base(unet)  # Control-LoRA: its ControlNet, built from this UNet's weights (cached)
    n_inputs = len(unet.input_blocks)
    if len(unet.output_blocks) != n_inputs:
        raise ControlError("This UNet's decoder does not mirror its encoder; ControlNet cannot be applied.")
    for prepared in controller.units:
        if prepared.kind.control == RESIDUALS and prepared.n_residuals != n_inputs + 1:
            raise ControlError(
                f"ControlNet '{prepared.unit.model}' gives {prepared.n_residuals} residuals but this UNet takes "
                f"{n_inputs + 1}: it was made for another base model (SD1.5 / SD2 / SDXL).")
    has_reference = any(prepared.kind.control == REFERENCE for prepared in controller.units)
    if has_reference:
        reference.check_units(controller.units)
    state = _State()
    state.encoder = {}
    levels = block_levels(unet)
    handles = []
    installed = Installed(unet, controller, handles, state)
    try:
        handles.append(unet.register_forward_pre_hook(_unet_pre_hook(controller, state, levels), with_kwargs=True))
        handles.append(unet.register_forward_hook(_unet_post_hook(state), with_kwargs=True))
        for j, block in enumerate(unet.output_blocks):
            handles.append(block.register_forward_pre_hook(_skip_hook(state, n_inputs - 1 - j)))
        handles.append(unet.middle_block.register_forward_hook(_middle_hook(state)))
        for k, block in enumerate(unet.input_blocks):
            handles.append(block.register_forward_hook(_encoder_hook(state, k)))
        # ATTENTION kinds (LLLite): their own pre-hooks on the UNet's layers, fed per call through `state`
        handles.extend(controller.attach(lambda: ldm_modules(unet), lambda key: (state.attention or {}).get(key)))
        if has_reference:
            state.reference = reference_hooks(unet)
            handles.extend(state.reference.install())
            handles.append(reference.Removal(state.reference))
    except BaseException:
        installed.remove()
        raise
    _installed[id(unet)] = installed
    return installed


@contextlib.contextmanager
def hooked(unet, controller: Controller) -> Iterator[Controller]:
    """Control the ldm/sgm `unet` with `controller` inside the block; nothing of ours remains afterwards."""
    installed = install(unet, controller)
    try:
        yield controller
    finally:
        installed.remove()
