"""Per-step ControlNet control for every enabled unit, summed. Knows no host.

A host (hosts/ldm.py, hosts/diffusers.py) catches each UNet call, hands its inputs over as a `UNetCall`, and
puts the returned `Residuals` where each part goes: ControlNet residuals onto the UNet's skip connections and
middle block, T2I-Adapter features onto the outputs of the encoder's input blocks. Which part a unit feeds is
its model's kind (lib_controlnet.models.kinds). The driver of the sampling loop
tells the `Controller` which step it is in and how the batch rows are laid out (`begin_step`), and which pass
(first or hires-fix) it is in (`set_pass`).
"""
from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, Optional, Sequence, Union

import torch
import torch.nn.functional as F

from lib_controlnet import control_attention, control_union
from lib_controlnet.control_forward import (adapter_features, added_embedding_input, controlnet_residuals,
                                            hint_embedding)
from lib_controlnet.cpu_kernels import use_fastest_kernels
from lib_controlnet.control_units import (SOFT_WEIGHT_BASE, ControlError, ControlJob, PreparedUnit,  # noqa: F401
                                          prepare_units)
from lib_controlnet.hook_handles import removed_on_error
from lib_controlnet.models.kinds import ENCODER_FEATURES, RESIDUALS
from lib_controlnet.models.kinds import ATTENTION, AttentionCall
from lib_controlnet.models.kinds import REFERENCE
from lib_controlnet.unit import ControlMode, HiResFixOption

ALL_ROWS = slice(None)


@dataclasses.dataclass(frozen=True)
class RowLayout:
    """Which rows of the UNet's batch are conditional, and which image of the job each row belongs to.

    A step may cover its rows in one UNet call or in several consecutive ones (the WebUI with
    `batch_cond_uncond` off); the controller hands out the rows in call order.
    """

    cond: tuple[bool, ...]
    image_index: tuple[int, ...]

    def __post_init__(self):
        if len(self.cond) != len(self.image_index):
            raise ValueError("cond and image_index must have one entry per row")

    @classmethod
    def all_cond(cls, n_images: int) -> "RowLayout":
        return cls((True,) * n_images, tuple(range(n_images)))

    @classmethod
    def diffusers_cfg(cls, n_images: int) -> "RowLayout":
        """diffusers' pipelines: torch.cat([uncond, cond])."""
        return cls((False,) * n_images + (True,) * n_images, tuple(range(n_images)) * 2)

    @classmethod
    def webui_cfg(cls, repeats: Sequence[int], skip_uncond: bool = False, is_edit_model: bool = False) -> "RowLayout":
        """The WebUI's CFG denoiser (1.10): x_in holds, per image i, `repeats[i]` conditional rows (one per
        AND-prompt), then one unconditional row per image (two for instruct-pix2pix edit models: text-uncond
        and image-uncond), and no unconditional rows when it skips them (`skip_uncond`)."""
        cond = [True] * sum(repeats)
        images = [i for i, n in enumerate(repeats) for _ in range(n)]
        if not skip_uncond:
            for _ in range(2 if is_edit_model else 1):
                cond += [False] * len(repeats)
                images += list(range(len(repeats)))
        return cls(tuple(cond), tuple(images))

    def __len__(self) -> int:
        return len(self.cond)


@dataclasses.dataclass
class UNetCall:
    """What a host hands over from one UNet call. `y` is SDXL's added-condition vector (sgm's `y`); diffusers
    hosts may give `text_embeds` + `time_ids` instead and the controller builds `y` from them."""

    sample: torch.Tensor
    timestep: Any
    context: torch.Tensor
    y: Optional[torch.Tensor] = None
    text_embeds: Optional[torch.Tensor] = None
    time_ids: Optional[torch.Tensor] = None


@dataclasses.dataclass
class Residuals:
    """Full-batch control for one UNet call. `down` + `mid`: residuals, one per UNet input block (skip
    connection), then the middle block (None when no ControlNet-like unit is active). `encoder`: feature maps
    to add to the encoder's features, in the UNet's order, as diffusers' `down_intrablock_additional_residuals`
    (T2I-Adapter; None when no adapter is active)."""

    down: Optional[list[torch.Tensor]] = None
    mid: Optional[torch.Tensor] = None
    encoder: Optional[list[torch.Tensor]] = None
    # ATTENTION units (LLLite): {id(unit): AttentionCall} for the hooks the kind attached (`Controller.attach`)
    attention: Optional[dict] = None


class Controller:
    """Computes, for each UNet call, the summed residuals of all units active at the current step."""

    def __init__(self, job: ControlJob, units: Optional[list[PreparedUnit]] = None):
        self.job = job
        self.units = units if units is not None else prepare_units(job)
        for prepared in self.units:
            _for_sampling(prepared.model)
        control_union.check_units(self.units)
        self.step = 0
        self.total_steps = max(int(job.steps), 1)
        self.hires_pass = False
        self.width, self.height = job.width, job.height
        self._rows: Optional[RowLayout] = None
        self._cursor = 0
        self._attached: set = set()  # ids of the ATTENTION units (PreparedUnit) whose hooks a host attached

    # --- driven by the sampling loop -------------------------------------------------------------------
    def begin_step(self, step: int, total_steps: Optional[int] = None, rows: Optional[RowLayout] = None) -> None:
        self.step = int(step)
        if total_steps:
            self.total_steps = int(total_steps)
        if rows is not None:
            self._rows = rows
        self._cursor = 0

    def set_rows(self, rows: Optional[RowLayout]) -> None:
        self._rows, self._cursor = rows, 0

    def set_pass(self, hires: bool, width: Optional[int] = None, height: Optional[int] = None,
                 steps: Optional[int] = None) -> None:
        """Switch to the hires-fix pass (hints at its size) or back to the first pass."""
        self.hires_pass = bool(hires)
        self.width = width or (self.width if hires else self.job.width)
        self.height = height or (self.height if hires else self.job.height)
        if steps:
            self.total_steps = int(steps)
        self.step = 0

    def is_active(self, prepared: PreparedUnit) -> bool:
        unit = prepared.unit
        if self.job.hires_fix:
            if self.hires_pass and unit.hr_option == HiResFixOption.LOW_RES_ONLY:
                return False
            if not self.hires_pass and unit.hr_option == HiResFixOption.HIGH_RES_ONLY:
                return False
        progress = self.step / self.total_steps
        return unit.guidance_start <= progress <= unit.guidance_end

    # --- called by hosts ---------------------------------------------------------------------------------
    def residuals(self, call: UNetCall) -> Optional[Residuals]:
        rows = self._take_rows(call.sample.shape[0])
        active = [u for u in self.units if self.is_active(u) and u.unit.weight != 0]
        if not active:
            return None
        total: Optional[Residuals] = None
        for prepared, union_group in control_union.groups(active):
            if prepared.kind.control == REFERENCE:  # run by the host's reference hooks (reference_passes)
                continue
            if prepared.unit.control_mode == ControlMode.CONTROL:
                selection = _select(rows, lambda c: c)  # unconditional rows get zero: skip computing them
                if selection is None:
                    continue
            else:
                selection = ALL_ROWS
            total = total or Residuals()
            batch = call.sample.shape[0]
            control = prepared.kind.control
            if control == RESIDUALS:
                down, mid = self._run_unit(prepared, call, rows, selection, union_group)
                summed = _accumulate(None if total.down is None else total.down + [total.mid], down + [mid],
                                     selection, batch)
                total.down, total.mid = summed[:-1], summed[-1]
            elif control == ENCODER_FEATURES:
                features = self._run_adapter(prepared, call, rows, selection)
                if total.encoder is not None and [f.shape[1:] for f in total.encoder] != [
                        f.shape[1:] for f in features]:
                    raise ControlError(f"T2I-Adapter '{prepared.unit.model}' gives features of other sizes than "
                                       "the job's other adapters; use adapters made for the same base model.")
                total.encoder = _accumulate(total.encoder, features, selection, batch)
            elif control == ATTENTION and id(prepared) in self._attached:
                total.attention = total.attention if total.attention is not None else {}
                total.attention[id(prepared)] = self._attention_call(prepared, call, rows, selection)
            else:
                raise ControlError(f"'{prepared.unit.model}' is a {prepared.kind.name} model, which the "
                                   "controller cannot run yet.")
        return total

    def reference_passes(self, call: UNetCall) -> tuple[list, RowLayout]:
        """The reference passes (lib_controlnet.reference) a host runs before this call's real pass. Call it
        before `residuals` for the same call: it reads the call's rows without moving on to the next call's."""
        from lib_controlnet import reference

        cursor = self._cursor
        try:
            rows = self._take_rows(call.sample.shape[0])
        finally:
            self._cursor = cursor
        return reference.plan_passes(self, call, rows), rows

    def reference_generator(self) -> torch.Generator:
        """The reference units' noise: one CPU generator per controller, so a repeated job repeats exactly."""
        if getattr(self, "_reference_generator", None) is None:
            self._reference_generator = torch.Generator("cpu").manual_seed(int(self.job.reference_seed))
        return self._reference_generator

    def _take_rows(self, batch: int) -> RowLayout:
        rows = self._rows
        if rows is None:
            return RowLayout.all_cond(batch)
        if self._cursor + batch > len(rows):
            self._cursor = 0  # a call outside the layout (another extension's extra call): start over
        if batch > len(rows):
            raise ControlError(f"The UNet got {batch} rows but the step's layout has only {len(rows)}.")
        part = RowLayout(rows.cond[self._cursor:self._cursor + batch],
                         rows.image_index[self._cursor:self._cursor + batch])
        self._cursor = (self._cursor + batch) % len(rows)
        return part

    def _run_unit(self, prepared: PreparedUnit, call: UNetCall, rows: RowLayout, selection, union_group=None):
        """One ControlNet forward, or one union forward for every unit of `union_group` (control_union.groups)."""
        model = prepared.model
        height, width = call.sample.shape[-2] * 8, call.sample.shape[-1] * 8
        with _on_device(model, prepared.unit.low_vram, self.job):
            embedded = self._embedding(prepared, width, height)
            images = _image_rows(rows, selection)
            embedded = _pick(embedded, images)
            sample = call.sample[selection]
            context = call.context[selection]
            timestep = call.timestep
            if torch.is_tensor(timestep) and timestep.ndim > 0 and timestep.shape[0] == call.sample.shape[0]:
                timestep = timestep[selection]
            y = call.y
            if y is None and call.text_embeds is not None:
                y = added_embedding_input(model, call.text_embeds, call.time_ids)
            if y is not None:
                y = y[selection]
            if union_group is not None:
                conditions = [embedded] + [_pick(self._embedding(other, width, height), images)
                                           for other in union_group[1:]]
                down, mid = control_union.residuals(union_group, sample.to(model.dtype), timestep,
                                                    context.to(model.dtype), conditions, y)
            else:
                down, mid = controlnet_residuals(model, sample.to(model.dtype), timestep, context.to(model.dtype),
                                                 embedded, y)
        mask = prepared.mask_at(width, height)
        if mask is not None:
            mask = _pick(mask.to(device=mid.device, dtype=mid.dtype), images)
        outputs = []
        for tensor, scale in zip(down + [mid], prepared.scales()):
            tensor = tensor.to(call.sample.dtype)
            if mask is not None:
                tensor = tensor * F.interpolate(mask, size=tensor.shape[-2:], mode="area")
            outputs.append(tensor.mul_(scale) if not tensor.requires_grad else tensor * scale)
        return outputs[:-1], outputs[-1]

    def _run_adapter(self, prepared: PreparedUnit, call: UNetCall, rows: RowLayout, selection) -> list[torch.Tensor]:
        """The adapter's features for these rows, scaled and masked; computed once per size, not per step."""
        height, width = call.sample.shape[-2] * 8, call.sample.shape[-1] * 8
        key = ("features", width, height, str(prepared.model.device), prepared.model.dtype)
        cache = prepared._embeddings
        if key not in cache:
            cache.clear()
            with _on_device(prepared.model, prepared.unit.low_vram, self.job), torch.no_grad():
                cache[key] = [f.to(call.sample.device) for f in
                              adapter_features(prepared.model, prepared.hint(width, height))]
        images = _image_rows(rows, selection)
        mask = prepared.mask_at(width, height)
        outputs = []
        for feature, scale in zip(cache[key], prepared.scales()):
            feature = _pick(feature, images).to(call.sample.dtype)
            if mask is not None:
                feature = feature * F.interpolate(_pick(mask.to(feature.device, feature.dtype), images),
                                                  size=feature.shape[-2:], mode="area")
            outputs.append(feature * scale)
        return outputs

    # --- kinds that live on the UNet itself (called by hosts when they install) ---------------------------
    def bind_base(self, unet) -> None:
        """Units whose kind builds its model from the base (Control-LoRA) get that model for this UNet, on the
        job's device and dtype; other units keep theirs."""
        for prepared in self.units:
            device = self.job.offload_device if prepared.unit.low_vram else self.job.device
            with torch.no_grad():
                model = prepared.kind.for_base(prepared.model, unet, dtype=self.job.dtype, device=device)
            if model is not prepared.model:
                prepared.model, prepared._kind = model, None
                prepared._embeddings.clear()
                _for_sampling(model)

    def attach(self, modules_of, current) -> list:
        """Hook every ATTENTION unit's modules onto the UNet's layers (`modules_of()`: ldm name -> module);
        `current(key)` gives the hooks of the unit `key` (its id: two units may share one loaded model) its
        AttentionCall for the call under way. The host removes the returned handles with its own."""
        handles: list = []
        modules = None
        with removed_on_error(handles, on_error=self._attached.clear):
            for prepared in self.units:
                if prepared.kind.control == ATTENTION:
                    modules = modules if modules is not None else modules_of()
                    model = prepared.model
                    if prepared.unit.low_vram:  # its hooks run inside every UNet call: it stays beside the UNet
                        model.to(self.job.device)
                    key = id(prepared)
                    handles += prepared.kind.attach(model, modules, lambda key=key: current(key))
                    self._attached.add(key)
        return handles

    def _attention_call(self, prepared: PreparedUnit, call: UNetCall, rows: RowLayout, selection) -> AttentionCall:
        """What the unit's attention hooks need in this call; the kind's embedding computed once per size."""
        height, width = call.sample.shape[-2] * 8, call.sample.shape[-1] * 8
        key = ("attention", width, height, str(prepared.model.device), prepared.model.dtype)
        cache = prepared._embeddings
        if key not in cache:
            cache.clear()
            with torch.no_grad():
                cache[key] = prepared.kind.embed_unit(prepared, width, height)
        images = _image_rows(rows, selection)
        if not prepared.kind.averages_images and max(images) >= prepared.hint(width, height).shape[0] > 1:
            raise ControlError(f"The unit has {prepared.hint(width, height).shape[0]} control images for a batch "
                               f"of {max(images) + 1}.")
        return AttentionCall(cache[key], images, selection, float(prepared.unit.weight),
                             prepared.mask_at(width, height), rows.cond)

    def _embedding(self, prepared: PreparedUnit, width: int, height: int) -> torch.Tensor:
        key = (width, height, str(prepared.model.device), prepared.model.dtype)
        cache = prepared._embeddings
        if key not in cache:
            cache.clear()  # one size at a time: the first pass's embedding is not needed in the hires pass
            with torch.no_grad():
                cache[key] = hint_embedding(prepared.model, prepared.hint(width, height))
        return cache[key]

    def close(self) -> None:
        self._attached.clear()
        for prepared in self.units:
            prepared._embeddings.clear()
            prepared._hints.clear()
            prepared._masks.clear()
            control_attention.release(prepared.model)


def _for_sampling(model) -> None:
    """The faster CPU kernel per layer shape, and the text's attention keys kept across steps (both leave the
    numbers as they were; both idempotent, so a model cached between jobs is prepared once)."""
    use_fastest_kernels(model)
    control_attention.keep_text_keys(model)


def _select(rows: RowLayout, predicate) -> Union[slice, torch.Tensor, None]:
    """The rows matching `predicate` as a slice when contiguous (a view, no copy), else an index tensor."""
    picked = [i for i, c in enumerate(rows.cond) if predicate(c)]
    if not picked:
        return None
    if picked == list(range(picked[0], picked[-1] + 1)):
        return slice(picked[0], picked[-1] + 1)
    return torch.tensor(picked, dtype=torch.long)


def _image_rows(rows: RowLayout, selection) -> list[int]:
    indices = list(range(len(rows)))
    chosen = indices[selection] if isinstance(selection, slice) else [indices[i] for i in selection.tolist()]
    return [rows.image_index[i] for i in chosen]


def _pick(per_image: torch.Tensor, images: list[int]) -> torch.Tensor:
    """Per-row view of a per-image tensor: a broadcast view when the unit has one image for all rows."""
    if per_image.shape[0] == 1:
        return per_image.expand(len(images), *per_image.shape[1:])
    if max(images) >= per_image.shape[0]:
        raise ControlError(f"The unit has {per_image.shape[0]} control images for a batch of {max(images) + 1}.")
    return per_image.index_select(0, torch.tensor(images, dtype=torch.long, device=per_image.device))


def _accumulate(total: Optional[list], new: list, selection, batch: int) -> list:
    """Add a unit's tensors for the selected rows into the full-batch sums (None: nothing summed yet)."""
    if selection is ALL_ROWS:
        if total is None:
            return list(new)
        for acc, item in zip(total, new):
            acc.add_(item)
        return total
    if total is None:
        total = [t.new_zeros((batch, *t.shape[1:])) for t in new]
    for acc, item in zip(total, new):
        if isinstance(selection, slice):
            acc[selection] += item
        else:
            acc.index_add_(0, selection.to(acc.device), item)
    return total


@contextlib.contextmanager
def _on_device(model, low_vram: bool, job: ControlJob):
    """Low VRAM: the model sits on the offload device and visits the compute device only while it runs."""
    if not low_vram:
        yield
        return
    model.to(job.device)
    try:
        yield
    finally:
        model.to(job.offload_device)
