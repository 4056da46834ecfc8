"""Does a unit's ControlNet fit the checkpoint the WebUI has loaded?

Asked before a job starts, so that an SD1.5 ControlNet on an SDXL checkpoint (or the reverse) is one sentence
naming both (HTTP 422 from the API, the unit's error in the UI), instead of a shape error once the model is
loaded and the image made without it.
"""
from __future__ import annotations

from typing import Optional

from lib_controlnet.base_model import ARCHITECTURES

# The flags WebUI 1.10 sets on the model it loads (sd_models.load_model), most specific first.
_FLAGS = (("is_sdxl", "sdxl"), ("is_sd2", "sd2"), ("is_sd1", "sd15"))


def loaded_family() -> Optional[str]:
    """sd15 / sd2 / sdxl for the checkpoint the WebUI holds now, or None (none loaded, or one we cannot tell).
    `sd_models.model_data.sd_model` is read, not `shared.sd_model`, which would load a checkpoint to answer."""
    try:
        from modules import sd_models

        model = sd_models.model_data.sd_model
    except (ImportError, AttributeError):
        return None
    for flag, family in _FLAGS:
        if getattr(model, flag, False) is True:
            return family
    return None


def mismatch(model_name: str, family: Optional[str]) -> Optional[str]:
    """The sentence for a ControlNet made for another base than `family`, or None when it fits or cannot be
    told here (not a plain ControlNet file, unreadable: those have their own messages where they load)."""
    if family is None or not model_name:
        return None
    from lib_controlnet.models import get_registry, inspect_model

    other = _other_kind_mismatch(model_name, ARCHITECTURES[family])
    if other:
        return other
    try:
        info = inspect_model(get_registry().find(model_name))
    except Exception:  # noqa: BLE001 - other kinds and bad files are judged when the unit loads
        return None
    arch = ARCHITECTURES[family]
    if info.base in arch.controlnet_bases:
        return None
    return (f"'{model_name}' is a ControlNet for {info.base_label} and the loaded checkpoint is {arch.label}: "
            f"pick a ControlNet made for {arch.label}, or load an {info.base_label} checkpoint.")


def _other_kind_mismatch(model_name: str, arch) -> Optional[str]:
    """The same sentence for kinds whose files say their base (Control-LoRA, ControlNet-LLLite: SDXL)."""
    from lib_controlnet.models import get_registry
    from lib_controlnet.models.kinds import file_keys, kind_of_keys

    try:
        keys = file_keys(get_registry().find(model_name))
        kind = kind_of_keys(keys)
        made_for = kind.made_for(keys)
    except Exception:  # noqa: BLE001 - bad files have their own messages where they load
        return None
    if made_for is None or made_for in arch.controlnet_bases or made_for not in ARCHITECTURES:
        return None
    label = ARCHITECTURES[made_for].label
    a = "an" if kind.name[:1].upper() in "AEIOU" else "a"  # an IP-Adapter, a ControlNet
    return (f"'{model_name}' is {a} {kind.name} for {label} and the loaded checkpoint is {arch.label}: "
            f"pick {a} {kind.name} made for {arch.label}, or load an {label} checkpoint.")
