"""Units made ready for the controller: control maps detected, hints and masks at the generation size, models
loaded. Split from control.py, which runs them each step."""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional, Union

import numpy as np
import torch
import torch.nn.functional as F

from lib_controlnet.errors import UserError
from lib_controlnet.unit import ControlMode, ControlUnit, ResizeMode

SOFT_WEIGHT_BASE = 0.825  # "My prompt is more important": weight * 0.825 ** (distance from the middle block)


class ControlError(UserError):
    """A unit that cannot be applied (bad image, model that does not fit the UNet, ...)."""


@dataclasses.dataclass
class PreparedUnit:
    """A unit ready to run: its model and its control image(s) after detection, at the source size.

    `source` holds one HxWx3 uint8 detected map per image (or a single one for all), or a float tensor
    (N, 3, H, W) in [0, 1] given directly. `mask` (optional) is HxW floats in [0, 1] per image, or a tensor
    (N, 1, H, W): where the unit acts.
    """

    unit: ControlUnit
    model: Any
    source: Union[list, torch.Tensor]
    mask: Union[list, torch.Tensor, None] = None
    _hints: dict = dataclasses.field(default_factory=dict, repr=False)
    _embeddings: dict = dataclasses.field(default_factory=dict, repr=False)
    _masks: dict = dataclasses.field(default_factory=dict, repr=False)
    _kind: Any = dataclasses.field(default=None, repr=False)

    @property
    def kind(self):
        """The model's kind (models/kinds): says which host hook point the unit's output goes to."""
        if self._kind is None:
            from lib_controlnet.models.kinds import kind_of_model

            self._kind = kind_of_model(self.model)
        return self._kind

    @property
    def n_residuals(self) -> int:
        """How many tensors the unit gives per call: residuals (ControlNet) or encoder features (adapter)."""
        return self.kind.n_outputs(self.model)

    def scales(self) -> list[float]:
        n, weight = self.n_residuals, self.unit.weight
        if self.unit.control_mode == ControlMode.BALANCED:
            return [weight] * n
        return [weight * SOFT_WEIGHT_BASE ** (n - 1 - i) for i in range(n)]

    def hint(self, width: int, height: int) -> torch.Tensor:
        key = (width, height)
        if key not in self._hints:
            self._hints[key] = _to_target(self.source, width, height, self.unit.resize_mode, channels=3)
        return self._hints[key]

    def mask_at(self, width: int, height: int) -> Optional[torch.Tensor]:
        if self.mask is None:
            return None
        key = (width, height)
        if key not in self._masks:
            self._masks[key] = _to_target(self.mask, width, height, self.unit.resize_mode, channels=1)
        return self._masks[key]


def _to_target(source, width: int, height: int, resize_mode: ResizeMode, channels: int) -> torch.Tensor:
    """(N, C, height, width) float tensor in [0, 1] from detected maps / masks / a tensor."""
    if torch.is_tensor(source):
        tensor = source.float()
        if tuple(tensor.shape[-2:]) != (height, width):
            tensor = F.interpolate(tensor, size=(height, width), mode="bilinear", align_corners=False)
        return tensor
    from lib_controlnet import images

    out = []
    for item in source:
        array = np.asarray(item)
        if array.ndim == 2:  # masks: resize as a 3-channel image so every resize mode treats them alike
            array = np.repeat((np.clip(array, 0, 1) * 255).round().astype(np.uint8)[..., None], 3, axis=2)
        resized = images.resize_to_target(array, width, height, resize_mode)
        tensor = torch.from_numpy(np.ascontiguousarray(resized)).float().div_(255.0).permute(2, 0, 1)
        out.append(tensor[:channels] if channels == 3 else tensor.mean(dim=0, keepdim=True))
    return torch.stack(out)


@dataclasses.dataclass
class ControlJob:
    """Everything the controller needs for one generation job (one parameter object, not a long list)."""

    units: list  # PreparedUnit (ready) or ControlUnit (to be detected and loaded by prepare_units)
    width: int
    height: int
    steps: int
    device: Union[str, torch.device] = "cpu"
    dtype: torch.dtype = torch.float32
    hires_fix: bool = False  # whether this job has a second (hires-fix) pass; hr_option only matters then
    offload_device: Union[str, torch.device] = "cpu"  # where low-VRAM units' models wait between calls
    load_model: Optional[Callable[[str], Any]] = None  # name or path -> diffusers ControlNetModel
    # reference units (lib_controlnet.reference): images (N, 3, H, W) in [0, 1] -> the base's latents (scaled);
    # the base's alphas_cumprod, to noise them to each step's timestep; the seed of that noise
    encode_latent: Optional[Callable[[torch.Tensor], torch.Tensor]] = None
    alphas_cumprod: Any = None
    reference_seed: int = 0


def prepare_units(job: ControlJob) -> list[PreparedUnit]:
    """Detect each active unit's control map and load its model; PreparedUnits pass through untouched."""
    prepared = []
    for index, item in enumerate(job.units):
        if isinstance(item, PreparedUnit):
            prepared.append(item)
            continue
        unit: ControlUnit = item
        if not unit.is_active:
            continue
        from lib_controlnet import reference

        if reference.is_reference(unit.module):  # no model file: the model field is not read
            if unit.image is None:
                raise ControlError(f"ControlNet unit {index} ({unit.module}) has no reference image.")
            source, mask = _detect(unit, job)
            prepared.append(PreparedUnit(unit=unit, model=reference.ReferenceModel(unit.module), source=source,
                                         mask=mask))
            continue
        if not unit.uses_model:
            raise ControlError(f"ControlNet unit {index} has no model selected.")
        if unit.image is None:
            raise ControlError(f"ControlNet unit {index} has no control image.")
        load = job.load_model or _default_model_loader
        model = load(unit.model)
        model = model.to(device=job.offload_device if unit.low_vram else job.device, dtype=job.dtype)
        source, mask = _detect(unit, job)
        prepared.append(PreparedUnit(unit=unit, model=model, source=source, mask=mask))
    return prepared


def _default_model_loader(name: str):
    from lib_controlnet.models import get_controlnet

    return get_controlnet(name)


def _detect(unit: ControlUnit, job: ControlJob):
    """Run the unit's preprocessor on each of its images (one, or a list: one per image of the batch)."""
    from lib_controlnet import images, preprocess

    items = unit.image if isinstance(unit.image, (list, tuple)) else [unit.image]
    detected, masks = [], []
    for item in items:
        rgb, mask = images.split_image_and_mask(item)
        if mask is None and unit.mask is not None:
            mask = unit.mask
        if unit.module.lower() != "none":
            if unit.pixel_perfect:
                resolution = preprocess.pixel_perfect_resolution(rgb.shape[:2], job.width, job.height,
                                                                 unit.resize_mode)
            else:
                resolution = None if unit.processor_res == -1 else unit.processor_res  # None: its default
            rgb = preprocess.run(unit.module, rgb, resolution=resolution,
                                 threshold_a=None if unit.threshold_a == -1 else unit.threshold_a,
                                 threshold_b=None if unit.threshold_b == -1 else unit.threshold_b,
                                 mask=mask)  # inpaint_only+lama fills the masked area with it
        detected.append(rgb[..., :3])
        if mask is not None:
            # drawn on the input image; brought to the detected map's size so both are resized alike
            masks.append(images.decode_mask(mask, size=(rgb.shape[1], rgb.shape[0])).astype(np.float32) / 255.0)
    if masks and len(masks) != len(detected):
        raise ControlError("Give a mask for every control image of a unit, or none.")
    return detected, (masks or None)
