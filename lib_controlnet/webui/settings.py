"""The "ControlNet" section of the WebUI's settings, mirrored into lib_controlnet.settings.

The WebUI owns the values (its config.json, its settings page, its command-line flags); every other part of
the extension reads lib_controlnet.settings, which `sync()` refreshes from the WebUI.
"""
from __future__ import annotations

from pathlib import Path

from lib_controlnet import settings as cnet_settings

SECTION = ("control_net", "ControlNet")


def _option_specs(gr) -> dict:
    """key -> (default, label, component, component_args)."""
    defaults = cnet_settings.Settings()
    return {
        "control_net_model_dirs": ("", "Extra folders with ControlNet models (separate several with ';')", None, None),
        "control_net_annotator_dir": ("", "Folder with preprocessor (annotator) weights; empty: "
                                      f"{defaults.annotator_models_path}", None, None),
        "control_net_unit_count": (defaults.unit_count, "Number of ControlNet units (needs a UI reload)",
                                   gr.Slider, {"minimum": 1, "maximum": 10, "step": 1}),
        "control_net_model_cache_size": (defaults.model_cache_size, "ControlNet models kept in memory",
                                         gr.Slider, {"minimum": 1, "maximum": 10, "step": 1}),
        "control_net_preprocessor_cache_size": (defaults.preprocessor_cache_size,
                                                "Preprocessor results kept in memory", gr.Slider,
                                                {"minimum": 0, "maximum": 64, "step": 1}),
        "control_net_save_detected_maps": (defaults.save_detected_maps, "Save detected maps to a folder", None, None),
        "control_net_detected_maps_dir": ("", f"Folder for detected maps; empty: {defaults.detected_maps_dir}",
                                          None, None),
        "control_net_allow_annotator_downloads": (cnet_settings.WEBUI_DOWNLOADS_DEFAULT,
                                                  "Allow preprocessors to download missing weights", None, None),
        "control_net_annotator_precision": (defaults.annotator_precision,
                                            "Preprocessor network precision (auto: bfloat16 where this CPU runs it "
                                            "faster: AMX, or avx512_bf16 when measured so; maps within a few grey "
                                            "levels; "
                                            "float32: exactly controlnet-aux's maps)", gr.Radio,
                                            {"choices": list(cnet_settings.ANNOTATOR_PRECISIONS)}),
    }


def add_options() -> None:
    """on_ui_settings: declare the section's options (values then come from the WebUI's config)."""
    import gradio as gr
    from modules import shared

    for key, (default, label, component, component_args) in _option_specs(gr).items():
        info = shared.OptionInfo(default, label, component, component_args, onchange=sync, section=SECTION)
        if key == "control_net_unit_count":
            info = info.needs_reload_ui()
        shared.opts.add_option(key, info)


def _opt(opts, key, default):
    return opts.data.get(key, default) if hasattr(opts, "data") else getattr(opts, key, default)


def _split_dirs(text) -> list[Path]:
    return [Path(p.strip()).expanduser() for p in str(text or "").split(";") if p.strip()]


def sync() -> cnet_settings.Settings:
    """Copy the WebUI's option values and command-line flags into lib_controlnet.settings."""
    from modules import paths, shared

    opts, cmd = shared.opts, shared.cmd_opts
    defaults = cnet_settings.Settings()
    model_dirs = [cnet_settings.DEFAULT_MODELS_DIR, Path(paths.models_path) / "ControlNet"]
    if getattr(cmd, "controlnet_dir", None):
        model_dirs.append(Path(cmd.controlnet_dir))
    model_dirs += _split_dirs(_opt(opts, "control_net_model_dirs", ""))
    annotator = getattr(cmd, "controlnet_annotator_models_path", None) or _opt(opts, "control_net_annotator_dir", "")
    pre_cache = getattr(cmd, "controlnet_preprocessor_cache_size", None)
    if pre_cache is None:
        pre_cache = _opt(opts, "control_net_preprocessor_cache_size", defaults.preprocessor_cache_size)
    maps_dir = _opt(opts, "control_net_detected_maps_dir", "")
    from annotators import weights

    weights.use_surface("webui")  # the missing-weights sentence points at this settings section
    return cnet_settings.update_settings(
        model_dirs=list(dict.fromkeys(model_dirs)),
        annotator_models_path=Path(annotator) if annotator else defaults.annotator_models_path,
        unit_count=int(_opt(opts, "control_net_unit_count", defaults.unit_count)),
        model_cache_size=int(_opt(opts, "control_net_model_cache_size", defaults.model_cache_size)),
        preprocessor_cache_size=int(pre_cache),
        save_detected_maps=bool(_opt(opts, "control_net_save_detected_maps", defaults.save_detected_maps)),
        detected_maps_dir=Path(maps_dir) if maps_dir else defaults.detected_maps_dir,
        allow_annotator_downloads=bool(_opt(opts, "control_net_allow_annotator_downloads",
                                            cnet_settings.WEBUI_DOWNLOADS_DEFAULT)),
        annotator_precision=_precision(_opt(opts, "control_net_annotator_precision", defaults.annotator_precision)),
    )


def _precision(value) -> str:
    """A hand-edited config.json may hold anything; an unknown value falls back to the default."""
    value = str(value)
    return value if value in cnet_settings.ANNOTATOR_PRECISIONS else cnet_settings.Settings().annotator_precision
