"""What the panel and the HTTP API list: preprocessors with their sliders, models, control types.

No gradio here: the HTTP routes (lib_controlnet.api) and the Gradio panel both read this one view of the
preprocessor and model registries, so the dropdowns and `/controlnet/*` answers can never disagree.
"""
from __future__ import annotations

import dataclasses
from typing import Any

ALL_TYPES = "All"
NO_MODEL = "None"
NO_MODULE = "none"

def _preprocess():
    from lib_controlnet import preprocess  # imported late: the preprocessor registry loads annotator code

    return preprocess


def _models():
    from lib_controlnet import models

    return models


def module_names(alias_names: bool = False) -> list[str]:
    return list(_preprocess().list_modules(alias_names=alias_names))


def get_preprocessor(name: str):
    """The registry's Preprocessor, or a PreprocessorError (a UserError) naming the unknown module."""
    return _preprocess().get_preprocessor(name)


@dataclasses.dataclass
class SliderLayout:
    """How the panel's three generic sliders (resolution, threshold A, threshold B) look for one module;
    None hides a slot."""

    resolution: dict | None
    threshold_a: dict | None
    threshold_b: dict | None


def slider_layout(module: str) -> SliderLayout:
    """The registry lists a module's sliders by slot: [resolution, threshold A, threshold B]."""
    if not module or module.lower() == NO_MODULE:
        return SliderLayout(None, None, None)
    slots = list(get_preprocessor(module).sliders()) + [None, None, None]
    return SliderLayout(slots[0], slots[1], slots[2])


def module_detail(alias_names: bool = False) -> dict[str, dict]:
    return _preprocess().module_detail(alias_names=alias_names)


def model_names(update: bool = False) -> list[str]:
    registry = _models().get_registry()
    if update:
        registry.refresh()
    return list(registry.names())


def find_model(name: str):
    """Path of a registered model; ModelFileError (a UserError) when none matches."""
    return _models().get_registry().find(name)


def _type_modules(raw: Any) -> list[str]:
    if isinstance(raw, dict):
        for key in ("module_list", "modules", "preprocessors"):
            if key in raw:
                return list(raw[key])
        return []
    if isinstance(raw, (list, tuple)):
        return [getattr(m, "name", m) for m in raw]
    return []


def _type_default(raw: Any, modules: list[str]) -> str:
    if isinstance(raw, dict):
        for key in ("default_option", "default", "default_module"):
            if raw.get(key):
                return raw[key]
    non_trivial = [m for m in modules if m != NO_MODULE]
    return non_trivial[0] if non_trivial else NO_MODULE


def _model_matches(type_name: str, model: str) -> bool:
    # Model file names carry their type ("control_v11p_sd15_canny", "t2i-openpose", "...-depth-..."), as
    # users and the other WebUI extension rely on; a few types are spelled differently in file names.
    spellings = {"softedge": ("softedge", "hed", "pidi"), "segmentation": ("seg",), "normalmap": ("normal",),
                 "openpose": ("openpose", "pose"), "instructp2p": ("ip2p",), "ip2p": ("ip2p",)}
    key = type_name.lower().replace(" ", "").replace("/", "")
    lowered = model.lower()
    return any(s in lowered for s in spellings.get(key, (key,)))


def control_types(update_models: bool = False) -> dict[str, dict]:
    """{type: {module_list, model_list, default_option, default_model}} with "All" first, as the API answers."""
    modules = module_names(alias_names=True)
    try:
        models = model_names(update_models)
    except Exception:  # model registry not available: types still list their modules
        models = []
    raw_types = _preprocess().control_types()
    out = {ALL_TYPES: {"module_list": modules, "model_list": [NO_MODEL] + models,
                       "default_option": NO_MODULE, "default_model": NO_MODEL}}
    for type_name, raw in raw_types.items():
        if type_name == ALL_TYPES:
            continue
        type_modules = _type_modules(raw)
        if NO_MODULE not in type_modules:
            type_modules = [NO_MODULE] + type_modules
        type_models = [m for m in models if _model_matches(type_name, m)]
        out[type_name] = {
            "module_list": type_modules,
            "model_list": [NO_MODEL] + type_models,
            "default_option": _type_default(raw, type_modules),
            "default_model": type_models[0] if type_models else NO_MODEL,
        }
    return out
