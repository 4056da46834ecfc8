"""The panel's flat list of component values <-> ControlUnits (no gradio here).

The WebUI passes a script the values of the components its ui() returned, in order; its API puts the
`alwayson_scripts.ControlNet.args` entries at the start of that same list. So a call's args are either the
panel's flat values (UNIT_FIELDS per unit) or leading unit objects (dicts or ControlUnits) from an API client.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from lib_controlnet.unit import ControlUnit, ControlUnitError

# One unit's components in the order ui() returns them. `independent_image` and `control_type` are panel
# state (not unit fields); `image` is gradio's sketch value {"image": array, "mask": array} or None.
UNIT_FIELDS = (
    "enabled", "image", "independent_image", "batch_image_dir", "batch_mask_dir", "control_type",
    "module", "model", "weight", "guidance_start", "guidance_end", "processor_res", "threshold_a",
    "threshold_b", "control_mode", "resize_mode", "pixel_perfect", "low_vram", "hr_option",
    "union_control_type",
    "multi_images",
)
PANEL_ONLY_FIELDS = ("independent_image", "control_type")
# "multi_images": the Multi-Inputs tab's uploaded files (gradio File, file_count="multiple"): when any are given
# they are the unit's images, a list (an image-prompt unit averages them into one prompt), instead of the sketch.


@dataclasses.dataclass
class PanelUnit:
    """A unit as the panel holds it: the ControlUnit plus whether img2img should use the unit's own image."""

    unit: ControlUnit
    independent_image: bool = True


def sketch_to_image_and_mask(value: Any) -> tuple[Any, Any]:
    """gradio's sketch value -> (image, mask or None); an untouched canvas gives an all-zero mask: no mask."""
    if value is None:
        return None, None
    if isinstance(value, Mapping):
        image, mask = value.get("image"), value.get("mask")
        if mask is not None:
            array = np.asarray(mask)
            if array.ndim == 3 and array.shape[2] == 4:
                array = array[..., :3] * (array[..., 3:] > 0)  # gradio paints strokes opaque on a clear layer
            if array.size == 0 or not array.any():
                mask = None
        return image, mask
    return value, None


def uploaded_paths(value: Any) -> list[Path]:
    """gradio File values (temp-file wrappers with `.name`, dicts with "name", or paths) -> their paths."""
    if not value:
        return []
    items = value if isinstance(value, (list, tuple)) else [value]
    paths = []
    for item in items:
        name = item.get("name") if isinstance(item, Mapping) else getattr(item, "name", item)
        if name:
            paths.append(Path(name))  # a Path: images.to_pil reads it as a file, never as base64 text
    return paths


def unit_from_values(values: Mapping[str, Any]) -> PanelUnit:
    fields = {k: v for k, v in values.items() if k not in PANEL_ONLY_FIELDS}
    files = uploaded_paths(fields.pop("multi_images", None))
    image, mask = sketch_to_image_and_mask(fields.pop("image", None))
    if files:
        image, mask = files, None
    unit = ControlUnit.from_dict({**fields, "image": image, "mask": mask})
    # uploaded Multi-Inputs are the unit's own images: img2img does not replace them with its input
    return PanelUnit(unit, bool(values.get("independent_image", True)) or bool(files))


def is_unit_object(value: Any) -> bool:
    return isinstance(value, (ControlUnit, Mapping)) and not _looks_like_sketch(value)


def _looks_like_sketch(value: Any) -> bool:
    return isinstance(value, Mapping) and set(value) <= {"image", "mask"} and "image" in value


def split_args(args: Sequence[Any]) -> list[Any]:
    """The script's args as a list of units' raw values: unit objects (API) or dicts of panel values. The
    panel's unit count is read from the values themselves: the setting may have changed since the UI was built."""
    args = list(args)
    if args and is_unit_object(args[0]):
        leading = []
        for value in args:
            if not is_unit_object(value):
                break
            leading.append(value)
        return leading
    width = len(UNIT_FIELDS)
    if len(args) % width:
        raise ValueError(f"expected {width} panel values per unit, got {len(args)} values")
    return [dict(zip(UNIT_FIELDS, args[i:i + width])) for i in range(0, len(args), width)]


def units_from_args(args: Sequence[Any]) -> list[PanelUnit]:
    """Every unit in a script call, enabled or not; ControlUnitError names a bad field of an API unit as
    `<index>.<field>`."""
    out = []
    for index, raw in enumerate(split_args(args)):
        if isinstance(raw, ControlUnit):
            out.append(PanelUnit(raw, raw.image is not None))
        elif set(raw) >= set(UNIT_FIELDS):
            out.append(unit_from_values(raw))
        else:
            try:
                unit = ControlUnit.from_dict(raw)
            except ControlUnitError as error:
                raise ControlUnitError(f"{index}.{error.field}", error.message) from None
            out.append(PanelUnit(unit, unit.image is not None))
    return out


def values_of(unit: ControlUnit, control_type: str = "All", independent_image: bool = False) -> list[Any]:
    """A unit as the panel's flat values (for defaults and for pasting parameters back)."""
    data = unit.to_dict()
    data.update(control_type=control_type, independent_image=independent_image, image=None)
    data.update(multi_images=None)
    return [data[name] for name in UNIT_FIELDS]
