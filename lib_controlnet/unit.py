"""ControlUnit: the one parameter object that the panel, the API payload, infotext and the hook all speak.

Field names follow the WebUI ControlNet API payload so existing clients work unchanged; older clients'
names (`input_image`, `guidance`, `lowvram`, `guessmode`) and integer enum values are accepted too.
"""
from __future__ import annotations

import dataclasses
import enum
from typing import Any, Mapping


class ControlUnitError(ValueError):
    """A bad unit field. `field` names it so an API can answer 422 pointing at it."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


class _NamedEnum(enum.Enum):
    """An enum whose members users send by display name, by member name, or by the old integer index."""

    @classmethod
    def parse(cls, value: Any, field: str):
        if isinstance(value, cls):
            return value
        members = list(cls)
        if isinstance(value, bool):
            raise ControlUnitError(field, f"expected one of {cls.choices()}, got {value!r}")
        if isinstance(value, int) or (isinstance(value, float) and value.is_integer()):
            index = int(value)
            if 0 <= index < len(members):
                return members[index]
        if isinstance(value, str):
            wanted = value.strip().lower()
            for member in members:
                if wanted in (member.value.lower(), member.name.lower()):
                    return member
            if wanted.isdigit() and int(wanted) < len(members):
                return members[int(wanted)]
        raise ControlUnitError(field, f"expected one of {cls.choices()}, got {value!r}")

    @classmethod
    def choices(cls) -> list[str]:
        return [m.value for m in cls]


class ResizeMode(_NamedEnum):
    RESIZE = "Just Resize"
    INNER_FIT = "Crop and Resize"
    OUTER_FIT = "Resize and Fill"


class ControlMode(_NamedEnum):
    BALANCED = "Balanced"
    PROMPT = "My prompt is more important"
    CONTROL = "ControlNet is more important"


class HiResFixOption(_NamedEnum):
    BOTH = "Both"
    LOW_RES_ONLY = "Low res only"
    HIGH_RES_ONLY = "High res only"


class UnionControlType(_NamedEnum):
    """Which control type a ControlNet-Union model is told it gets (the other WebUI extension's
    `union_control_type` values; the integer index is the model's task index). Unknown: from the preprocessor's
    control type."""

    OPENPOSE = "OpenPose"
    DEPTH = "Depth"
    SOFT_EDGE = "Soft Edge"      # HED, PiDiNet, scribble, TEED
    HARD_EDGE = "Hard Edge"      # canny, lineart, MLSD
    NORMAL_MAP = "Normal Map"
    SEGMENTATION = "Segmentation"
    TILE = "Tile"                # ProMax only
    INPAINT = "Inpaint"          # ProMax only
    UNKNOWN = "Unknown"


# Names older clients send, mapped to the current field.
LEGACY_ALIASES = {
    "input_image": "image",
    "lowvram": "low_vram",
    "guidance": "guidance_end",
    "mask_image": "mask",
    "effective_region_mask": "mask",  # the other extension's region a unit (IP-Adapter) acts in
}

WEIGHT_RANGE = (0.0, 2.0)


@dataclasses.dataclass
class ControlUnit:
    enabled: bool = True
    module: str = "none"
    model: str = "None"
    weight: float = 1.0
    image: Any = None  # PIL image, numpy array, base64 string, path, {"image", "mask"} dict, or a list of those
    mask: Any = None
    resize_mode: ResizeMode = ResizeMode.INNER_FIT
    low_vram: bool = False
    processor_res: int = -1
    threshold_a: float = -1
    threshold_b: float = -1
    guidance_start: float = 0.0
    guidance_end: float = 1.0
    pixel_perfect: bool = False
    control_mode: ControlMode = ControlMode.BALANCED
    hr_option: HiResFixOption = HiResFixOption.BOTH
    save_detected_map: bool = True
    batch_image_dir: str = ""
    batch_mask_dir: str = ""
    union_control_type: UnionControlType = UnionControlType.UNKNOWN

    def __post_init__(self):
        self.union_control_type = UnionControlType.parse(self.union_control_type, "union_control_type")
        self.resize_mode = ResizeMode.parse(self.resize_mode, "resize_mode")
        self.control_mode = ControlMode.parse(self.control_mode, "control_mode")
        self.hr_option = HiResFixOption.parse(self.hr_option, "hr_option")
        for name in ("enabled", "low_vram", "pixel_perfect", "save_detected_map"):
            setattr(self, name, _as_bool(getattr(self, name), name))
        for name in ("weight", "guidance_start", "guidance_end", "threshold_a", "threshold_b"):
            setattr(self, name, _as_float(getattr(self, name), name))
        self.processor_res = int(_as_float(self.processor_res, "processor_res"))
        for name in ("module", "model", "batch_image_dir", "batch_mask_dir"):
            value = getattr(self, name)
            if value is None:
                value = "none" if name == "module" else ("None" if name == "model" else "")
            if not isinstance(value, str):
                raise ControlUnitError(name, f"expected a string, got {type(value).__name__}")
            setattr(self, name, value)
        self.validate()

    def validate(self) -> None:
        low, high = WEIGHT_RANGE
        if not low <= self.weight <= high:
            raise ControlUnitError("weight", f"must be between {low} and {high}, got {self.weight}")
        for name in ("guidance_start", "guidance_end"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ControlUnitError(name, f"must be between 0 and 1, got {value}")
        if self.guidance_start > self.guidance_end:
            raise ControlUnitError(
                "guidance_start",
                f"guidance_start ({self.guidance_start}) is after guidance_end ({self.guidance_end})",
            )
        from lib_controlnet.preprocess import resolution_error  # the registry's range (imported late: it imports us)

        problem = resolution_error(self.processor_res)
        if problem:
            raise ControlUnitError("processor_res", problem)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "ControlUnit":
        if not isinstance(data, Mapping):
            raise ControlUnitError("unit", f"expected an object, got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        values: dict[str, Any] = {}
        for key, value in data.items():
            if key == "guessmode":
                # Old clients' guess mode is today's "ControlNet is more important".
                if _as_bool(value, key) and "control_mode" not in data:
                    values["control_mode"] = ControlMode.CONTROL
                continue
            name = LEGACY_ALIASES.get(key, key)
            if name in known and (name == key or name not in data):
                values[name] = value
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly dict with enum display names, as the API returns them."""
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            out[f.name] = value.value if isinstance(value, enum.Enum) else value
        return out

    def replace(self, **changes) -> "ControlUnit":
        return dataclasses.replace(self, **changes)

    @property
    def uses_model(self) -> bool:
        return bool(self.model) and self.model.lower() != "none"

    @property
    def is_active(self) -> bool:
        return self.enabled and (self.uses_model or self.module.lower() != "none")


def _as_bool(value: Any, field: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in ("true", "false", "1", "0", "yes", "no"):
        return value.strip().lower() in ("true", "1", "yes")
    raise ControlUnitError(field, f"expected true or false, got {value!r}")


def _as_float(value: Any, field: str) -> float:
    if isinstance(value, bool):
        raise ControlUnitError(field, f"expected a number, got {value!r}")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ControlUnitError(field, f"expected a number, got {value!r}") from None
    if number != number or number in (float("inf"), float("-inf")):
        raise ControlUnitError(field, f"expected a finite number, got {value!r}")
    return number
