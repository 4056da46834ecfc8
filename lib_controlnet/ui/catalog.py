"""What the panel and the HTTP API list: preprocessors with their sliders, models, control types.

No gradio here: the HTTP routes (lib_controlnet.api) and the Gradio panel both read this one view of the
preprocessor and model registries, so the dropdowns and `/controlnet/*` answers can never disagree.
"""
from __future__ import annotations

import dataclasses

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


def _panel_types(models: list[str]) -> dict[str, tuple | None]:
    """Per listed model, the control types its kind says it fits (models/kinds: a union model every type it has,
    a T2I style adapter only its own), None where its file name must tell."""
    from lib_controlnet.models.kinds import panel_types_of

    try:
        paths = {entry.name: entry.path for entry in _models().get_registry().entries()}
    except Exception:  # no registry: names decide
        return {}
    return {model: panel_types_of(paths[model]) for model in models if model in paths}


def model_fits_type(type_name: str, model: str, kind_types: tuple | None = None) -> bool:
    """The one rule of the control-type filter: the kind's answer where its keys tell, else the file name."""
    if kind_types is not None:
        return type_name in kind_types
    return _model_matches(type_name, model)


def _model_matches(type_name: str, model: str) -> bool:
    # Model file names carry their type ("control_v11p_sd15_canny", "t2iadapter_depth", "...tile..."), as
    # users and the other WebUI extension rely on; a few types are spelled differently in file names.
    spellings = {"softedge": ("softedge", "hed", "pidi"), "segmentation": ("seg",), "normalmap": ("normal",),
                 "openpose": ("openpose", "pose"), "instructp2p": ("ip2p",), "t2i-adapter": ("t2i",),
                 # the types are named "Scribble" and "Tile" as the API answers; their files say sketch / blur too
                 "scribble": ("scribble", "sketch"), "tile": ("tile", "blur")}
    key = type_name.lower().replace(" ", "")
    words = spellings.get(key) or tuple(key.split("/"))  # "Tile/Blur": either word
    lowered = model.lower()
    return any(word in lowered for word in words)


def control_types(update_models: bool = False) -> dict[str, dict]:
    """{type: {module_list, model_list, default_option, default_model}} with "All" first, as the API answers."""
    modules = module_names(alias_names=True)
    try:
        models = model_names(update_models)
    except Exception:  # model registry not available: types still list their modules
        models = []
    raw_types = _preprocess().control_types()
    kind_types = _panel_types(models)
    out = {ALL_TYPES: {"module_list": modules, "model_list": [NO_MODEL] + models,
                       "default_option": NO_MODULE, "default_model": NO_MODEL}}
    for type_name, raw in raw_types.items():
        if type_name == ALL_TYPES:
            continue
        type_modules = list(raw["module_list"])
        if NO_MODULE not in type_modules:
            type_modules = [NO_MODULE] + type_modules
        type_models = [m for m in models if model_fits_type(type_name, m, kind_types.get(m))]
        out[type_name] = {
            "module_list": type_modules,
            "model_list": [NO_MODEL] + type_models,
            "default_option": raw.get("default_option", NO_MODULE),
            "default_model": type_models[0] if type_models else NO_MODEL,
        }
    return out


def panel_model_choices(types: dict[str, dict], control_type: str) -> list[str]:
    """The panel's Model choices for a control type: the type's own models, then every model whose name tells no
    type at all (a freshly trained "controlnet-mydata-1000"). The HTTP API lists those under "All" only, as the
    other extension does; the panel offers them under every type too, or a user's own model could never be used
    with the preprocessor its control type selects."""
    entry = types.get(control_type) or types[ALL_TYPES]
    if control_type == ALL_TYPES or control_type not in types:
        return list(entry["model_list"])
    typed = {model for name, other in types.items() if name != ALL_TYPES for model in other["model_list"]}
    untyped = [model for model in types[ALL_TYPES]["model_list"] if model not in typed]
    return list(entry["model_list"]) + untyped


def same_model(choices: list[str], current: str) -> str | None:
    """`current` if still listed, else the listed model of the same file name (a file exported again under its
    name gets a new "[hash]"), else None."""
    if current in choices:
        return current
    stem = str(current or "").rsplit(" [", 1)[0]
    return next((name for name in choices if name != NO_MODEL and name.rsplit(" [", 1)[0] == stem), None)
