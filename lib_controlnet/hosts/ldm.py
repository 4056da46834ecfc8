"""ControlNet control for the WebUI's UNet: ldm's `UNetModel` (SD1/SD2) and sgm's (SDXL, same layout plus `y`).

Module hooks only, never a replaced `forward`, so other extensions that wrap the UNet keep working:
- a forward pre-hook on the UNet reads x, timesteps, context and y and asks the Controller for residuals;
- a forward pre-hook on each `output_blocks[j]` adds residual k to the skip half of its input. The decoder
  feeds `cat([h, hs.pop()])` to output block j, and the popped skip is input block k = n-1-j's output; adding
  there, and not to input block k's own output, keeps the encoder's path untouched, as ControlNet defines;
- a forward hook on `middle_block` adds the last residual to its output.
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
from typing import Iterator, Optional

import torch

from lib_controlnet.control import ControlError, Controller, Residuals, UNetCall


class _State:
    residuals: Optional[Residuals] = None


def _unet_pre_hook(controller: Controller, state: _State):
    def hook(module, args, kwargs):
        def arg(name, index):
            if name in kwargs:
                return kwargs[name]
            return args[index] if len(args) > index else None

        state.residuals = None  # never let a failed call's residuals leak into the next one
        state.residuals = controller.residuals(UNetCall(
            sample=arg("x", 0), timestep=arg("timesteps", 1), context=arg("context", 2), y=arg("y", 3)))
        return None

    return hook


def _unet_post_hook(state: _State):
    def hook(module, args, kwargs, output):
        state.residuals = None
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


def _middle_hook(state: _State):
    def hook(module, args, output):
        if state.residuals is None:
            return None
        return output + state.residuals.mid.to(output.dtype)

    return hook


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
        self._state.residuals = None
        _installed.pop(id(self.unet), None)
        self.controller.close()


_installed: dict[int, Installed] = {}


def install(unet, controller: Controller) -> Installed:
    """Hook `controller` into the ldm/sgm `unet` until `.remove()`."""
    stale = _installed.get(id(unet))
    if stale is not None:
        stale.remove()
    n_inputs = len(unet.input_blocks)
    if len(unet.output_blocks) != n_inputs:
        raise ControlError("This UNet's decoder does not mirror its encoder; ControlNet cannot be applied.")
    for prepared in controller.units:
        if prepared.n_residuals != n_inputs + 1:
            raise ControlError(
                f"ControlNet '{prepared.unit.model}' gives {prepared.n_residuals} residuals but this UNet takes "
                f"{n_inputs + 1}: it was made for another base model (SD1.5 / SD2 / SDXL).")
    state = _State()
    handles = []
    installed = Installed(unet, controller, handles, state)
    try:
        handles.append(unet.register_forward_pre_hook(_unet_pre_hook(controller, state), with_kwargs=True))
        handles.append(unet.register_forward_hook(_unet_post_hook(state), with_kwargs=True))
        for j, block in enumerate(unet.output_blocks):
            handles.append(block.register_forward_pre_hook(_skip_hook(state, n_inputs - 1 - j)))
        handles.append(unet.middle_block.register_forward_hook(_middle_hook(state)))
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
