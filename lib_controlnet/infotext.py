"""Infotext: the `ControlNet N: "..."` entries of the WebUI's generation parameters, written and parsed.

A unit is written the way the other WebUI ControlNet extension writes it, so infotexts move between the two:
`Module: canny, Model: control_v11p_sd15_canny [d14c016b], Weight: 1.0, Resize Mode: Crop and Resize, ...`
(field names title-cased with spaces, hidden sliders (-1) left out). The WebUI then quotes the whole entry
with JSON quotes because it holds commas and colons. A value that itself holds a comma, colon or quote is
JSON-quoted inside the unit string (their writer refuses such units; our parser reads both). The older
format (`preprocessor: canny, model: ..., starting/ending: (0, 1), preprocessor params: (512, 100, 200)`)
is parsed too.
"""
from __future__ import annotations

import enum
import json
import re
from typing import Iterable, Mapping, Optional

from lib_controlnet.unit import ControlUnit, ControlUnitError, UnionControlType

PREFIX = "ControlNet"
# Written in this order; the name shown is the field name title-cased ("resize_mode" -> "Resize Mode").
INFOTEXT_FIELDS = ("module", "model", "weight", "resize_mode", "low_vram", "processor_res", "threshold_a",
                   "threshold_b", "guidance_start", "guidance_end", "pixel_perfect", "control_mode", "hr_option",
                   "save_detected_map", "union_control_type")
_INTEGRAL_WHEN_WHOLE = {"processor_res", "threshold_a", "threshold_b"}
_UNIT_KEY = re.compile(rf"^{PREFIX} (\d+)$")


class InfotextError(ControlUnitError):
    def __init__(self, message: str):
        super().__init__("infotext", message)


def display_name(field: str) -> str:
    return " ".join(word.capitalize() for word in field.split("_"))


def field_name(display: str) -> str:
    return "_".join(display.strip().lower().split())


def quote(value: str) -> str:
    """The WebUI's rule for a parameter value: JSON-quoted when it holds a comma, colon, quote or newline."""
    text = str(value)
    if any(ch in text for ch in ',:\n"'):
        return json.dumps(text, ensure_ascii=False)
    return text


def _format_value(field: str, value) -> str:
    if isinstance(value, enum.Enum):
        return str(value.value)
    if isinstance(value, float) and field in _INTEGRAL_WHEN_WHOLE and value.is_integer():
        return str(int(value))
    return str(value)


def unit_to_infotext(unit: ControlUnit) -> str:
    parts = []
    for field in INFOTEXT_FIELDS:
        value = getattr(unit, field)
        if value == -1 and field in _INTEGRAL_WHEN_WHOLE:
            continue  # hidden slider: the preprocessor's default applies
        if value is UnionControlType.UNKNOWN:
            continue  # only union units name their type; others' infotexts stay as they were
        parts.append(f"{display_name(field)}: {quote(_format_value(field, value))}")
    return ", ".join(parts)


def units_to_params(units: Iterable[ControlUnit]) -> dict[str, str]:
    """`{"ControlNet 0": "Module: ...", ...}` for the WebUI's extra_generation_params; disabled units keep
    their index (unit N stays `ControlNet N`) but are not written."""
    return {f"{PREFIX} {i}": unit_to_infotext(u) for i, u in enumerate(units) if u.is_active}


def split_params(text: str) -> list[tuple[str, str]]:
    """`Key: value, Key2: "quoted, value", Key3: (a, b)` -> [(key, raw value)], values unquoted."""
    pairs, i, n = [], 0, len(text)
    while i < n:
        while i < n and text[i] in " ,":
            i += 1
        colon = text.find(":", i)
        if colon == -1:
            break
        key = text[i:colon].strip()
        i = colon + 1
        while i < n and text[i] == " ":
            i += 1
        if i < n and text[i] == '"':
            end = i + 1
            while end < n and text[end] != '"':
                end += 2 if text[end] == "\\" else 1
            raw = text[i:end + 1]
            try:
                value = json.loads(raw)
            except json.JSONDecodeError:
                raise InfotextError(f"unterminated quoted value after {key!r}") from None
            i = end + 1
        else:
            depth, start = 0, i
            while i < n and not (text[i] == "," and depth == 0):
                depth += {"(": 1, ")": -1}.get(text[i], 0)
                i += 1
            value = text[start:i].strip()
        pairs.append((key, value))
    return pairs


_LEGACY_FIELDS = {"preprocessor": "module", "model": "model", "weight": "weight", "resize mode": "resize_mode",
                  "pixel perfect": "pixel_perfect", "control mode": "control_mode"}


def _tuple(value: str) -> list[str]:
    return [v.strip() for v in value.strip().strip("()").split(",") if v.strip()]


def unit_from_infotext(text: str) -> ControlUnit:
    """Parse one unit string (current or legacy format) into a ControlUnit; unknown keys are ignored."""
    values: dict = {}
    known = set(INFOTEXT_FIELDS)
    for key, value in split_params(text):
        lowered = key.strip().lower()
        if lowered == "starting/ending":
            bounds = _tuple(value)
            if len(bounds) == 2:
                values["guidance_start"], values["guidance_end"] = bounds
        elif lowered == "preprocessor params":
            for name, item in zip(("processor_res", "threshold_a", "threshold_b"), _tuple(value)):
                values[name] = item
        elif lowered in _LEGACY_FIELDS and key[:1].islower():
            values[_LEGACY_FIELDS[lowered]] = value
        elif field_name(key) in known:
            values[field_name(key)] = value
    if not values:
        raise InfotextError(f"no ControlNet unit fields in {text[:60]!r}")
    return ControlUnit.from_dict(values)


def units_from_params(params: Mapping[str, str]) -> dict[int, ControlUnit]:
    """`{"ControlNet 0": "...", ...}` (parsed generation parameters) -> {0: ControlUnit, ...}."""
    out = {}
    for key, value in params.items():
        match = _UNIT_KEY.match(str(key).strip())
        if match:
            out[int(match.group(1))] = unit_from_infotext(value)
    return out


def build_infotext(prompt: str, negative_prompt: str, params: Mapping[str, object]) -> str:
    """The WebUI's layout: prompt, `Negative prompt: ...` (when there is one), then `Key: value, ...`."""
    lines = [prompt]
    if negative_prompt:
        lines.append(f"Negative prompt: {negative_prompt}")
    lines.append(", ".join(f"{key}: {quote(value)}" for key, value in params.items() if value is not None))
    return "\n".join(lines)


def parse_infotext(text: str) -> tuple[str, str, dict[str, str]]:
    """(prompt, negative prompt, parameters) from an infotext in the WebUI's layout."""
    lines = text.strip("\n").split("\n")
    params_line: Optional[str] = None
    if lines and re.match(r"^\s*Steps:\s", lines[-1]):
        params_line = lines.pop()
    prompt, negative, in_negative = [], [], False
    for line in lines:
        if line.startswith("Negative prompt:"):
            in_negative = True
            line = line[len("Negative prompt:"):].strip()
        (negative if in_negative else prompt).append(line)
    params = dict(split_params(params_line)) if params_line else {}
    return "\n".join(prompt), "\n".join(negative), params
