"""User settings shared by every part of the extension.

The WebUI layer fills them from its "ControlNet" settings section and command-line flags; the CLI and the
standalone app from their own flags. Everything else only reads them.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

EXTENSION_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_MODELS_DIR = EXTENSION_ROOT / "models"
DEFAULT_ANNOTATOR_DIR = DEFAULT_MODELS_DIR / "annotators"
SHIPPED_CONFIGS_DIR = Path(__file__).resolve().parent / "configs"
# How the preprocessor networks that tolerate it compute (annotators.runtime.inference): "auto" is bfloat16
# where the CPU runs it faster (AMX; avx512_bf16 when a probe measures it faster, annotators.runtime.auto_precision)
# and float32 elsewhere; "float32" gives controlnet-aux's maps.
ANNOTATOR_PRECISIONS = ("auto", "float32", "bfloat16")
# In the WebUI a missing annotator file downloads by itself unless the user turns the setting off (as users of the
# other WebUI ControlNet extension expect); the CLI, the standalone app and the tests keep
# Settings.allow_annotator_downloads (off) unless asked (--allow-annotator-downloads).
WEBUI_DOWNLOADS_DEFAULT = True


@dataclasses.dataclass
class Settings:
    model_dirs: list[Path] = dataclasses.field(default_factory=lambda: [DEFAULT_MODELS_DIR])
    annotator_models_path: Path = DEFAULT_ANNOTATOR_DIR
    unit_count: int = 3
    model_cache_size: int = 2
    preprocessor_cache_size: int = 16
    save_detected_maps: bool = True
    detected_maps_dir: Path = EXTENSION_ROOT / "detected_maps"
    allow_annotator_downloads: bool = False
    allow_private_urls: bool = False
    annotator_precision: str = "auto"


_current = Settings()


def get_settings() -> Settings:
    return _current


def update_settings(**changes) -> Settings:
    unknown = set(changes) - {f.name for f in dataclasses.fields(Settings)}
    if unknown:
        raise KeyError(f"unknown settings: {sorted(unknown)}")
    precision = changes.get("annotator_precision", ANNOTATOR_PRECISIONS[0])
    if precision not in ANNOTATOR_PRECISIONS:
        raise ValueError(f"annotator_precision must be one of {', '.join(ANNOTATOR_PRECISIONS)}, got {precision!r}")
    for name, value in changes.items():
        setattr(_current, name, value)
    return _current
