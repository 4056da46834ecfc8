"""Infotext in the WebUI: `ControlNet N: "Module: ..., Model: ..., ..."` written into the generation
parameters, and read back when parameters are pasted (the text format itself is lib_controlnet.infotext's)."""
from __future__ import annotations

import logging
import re

from lib_controlnet.settings import get_settings
from lib_controlnet.ui import catalog
from lib_controlnet.ui.control_panel import paste_key
from lib_controlnet.ui.unit_args import UNIT_FIELDS
from lib_controlnet.unit import ControlUnit

log = logging.getLogger(__name__)

_KEY = re.compile(r"^ControlNet (\d+)$")
_NOT_PASTED = {"image", "mask", "batch_image_dir", "batch_mask_dir"}


def key(index: int) -> str:
    return f"ControlNet {index}"


def write(unit: ControlUnit) -> str | None:
    try:
        from lib_controlnet import infotext
    except ImportError as error:  # an incomplete install: generate anyway, without the infotext entry
        log.warning("ControlNet: infotext not written (%s)", error)
        return None
    return infotext.unit_to_infotext(unit)


def read(text: str) -> ControlUnit:
    from lib_controlnet import infotext

    return infotext.unit_from_infotext(text)


def pasted_values(unit: ControlUnit) -> dict:
    """The panel's values for a pasted unit, as the paste button converts them (by component type)."""
    data = unit.to_dict()
    return {name: data[name] for name in UNIT_FIELDS if name in data and name not in _NOT_PASTED}


def _panel_module_name(module: str) -> str:
    """The panel lists preprocessors by label ("depth_midas"); infotexts may hold the short name ("depth")."""
    try:
        return catalog.get_preprocessor(module).label
    except Exception:  # unknown here: paste it as written, the panel will say so on generate
        return module


def _control_type_of(module: str) -> str:
    """The control type whose list offers `module`, so that the panel shows it as chosen."""
    try:
        types = catalog.control_types()
        pre = catalog.get_preprocessor(module)
    except Exception:  # unknown module: the unfiltered list
        return catalog.ALL_TYPES
    for type_name, entry in types.items():
        if type_name != catalog.ALL_TYPES and pre.label in entry["module_list"]:
            return type_name
    return catalog.ALL_TYPES


def on_infotext_pasted(infotext_text: str, params: dict) -> None:
    """Expand each `ControlNet N` entry into per-field keys the panel's infotext_fields read; units that the
    text does not mention are switched off, so pasting never leaves an old unit silently enabled."""
    found = {}
    for name, value in list(params.items()):
        match = _KEY.match(str(name))
        if not match:
            continue
        try:
            found[int(match.group(1))] = read(str(value))
        except Exception as error:  # one unreadable unit must not stop the rest of the paste
            log.warning("ControlNet: could not read %s from pasted parameters: %s", name, error)
    for index in range(get_settings().unit_count):
        unit = found.get(index)
        if unit is None:
            params[paste_key(index, "enabled")] = False
            continue
        for field, value in pasted_values(unit).items():
            params[paste_key(index, field)] = value
        params[paste_key(index, "module")] = _panel_module_name(unit.module)
        params[paste_key(index, "enabled")] = True
        params[paste_key(index, "control_type")] = _control_type_of(unit.module)
