"""The registry of control-model kinds: ControlNet, ControlNet-Union, T2I-Adapter, Control-LoRA, LLLite, IP-Adapter.

Each kind is one module holding one `Kind`: how to recognise its files by their keys (never by file name), how
to load them, and how it controls the UNet (`control`):
- RESIDUALS: residuals onto the decoder's skip connections and the middle block (ControlNet);
- ENCODER_FEATURES: features added to the outputs of the encoder's input blocks (T2I-Adapter);
- ATTENTION: modules on attention (ControlNet-LLLite; IP-Adapter: image tokens joining cross-attention).
Control-LoRA controls by RESIDUALS through a ControlNet it builds from the loaded base UNet (`Kind.for_base`).
The controller asks a loaded model's kind (`kind_of_model`) and drives it through the host hook point it names.
"""
from __future__ import annotations

from pathlib import Path

from lib_controlnet.models.errors import ModelFileError
from lib_controlnet.models.kinds.base import ATTENTION, ENCODER_FEATURES, RESIDUALS, FileKeys, Kind, file_keys
from lib_controlnet.models.kinds.base import AttentionCall  # noqa: F401  (ATTENTION kinds' per-call input)
from lib_controlnet.models.kinds.controlnet import CONTROLNET
from lib_controlnet.models.kinds.ip_adapter import IP_ADAPTER
from lib_controlnet.models.kinds.control_lora import CONTROL_LORA
from lib_controlnet.models.kinds.lllite import LLLITE
from lib_controlnet.models.kinds.base import REFERENCE
from lib_controlnet.models.kinds.reference import REFERENCE_KIND
from lib_controlnet.models.kinds.t2i_adapter import T2I_ADAPTER
from lib_controlnet.models.kinds.t2i_style import T2I_STYLE
from lib_controlnet.models.kinds.union import UNION

# Most specific first: a union file also holds ControlNet keys, a Control-LoRA file ControlNet-like ones, an
# IP-Adapter FaceID file LoRA keys (`*_lora.up.weight`) inside its ip_adapter group.
KINDS: tuple[Kind, ...] = (UNION, IP_ADAPTER, CONTROL_LORA, LLLITE, T2I_ADAPTER, CONTROLNET)
KINDS += (REFERENCE_KIND,)  # recognises no file: reference units are chosen by their preprocessor
KINDS += (T2I_STYLE,)  # `style_embedding`: TencentARC's style model, tokens joining cross-attention

__all__ = ["KINDS", "Kind", "RESIDUALS", "ENCODER_FEATURES", "ATTENTION", "FileKeys", "file_keys", "kind_of_keys",
           "kind_of_file", "kind_of_model", "load_control_model", "other_kind_of_keys", "AttentionCall",
           "panel_types_of"]
__all__ += ["REFERENCE"]


def kind_of_keys(keys: FileKeys) -> Kind:
    """The kind whose files hold these keys; plain ControlNet (which words its own errors) when none claims them."""
    return next((kind for kind in KINDS if kind.recognises(keys)), CONTROLNET)


def other_kind_of_keys(keys: FileKeys) -> Kind | None:
    """The non-ControlNet kind these keys belong to, if any (for ControlNet-only tools such as export)."""
    kind = kind_of_keys(keys)
    return None if kind is CONTROLNET else kind


def kind_of_file(path) -> Kind:
    return kind_of_keys(file_keys(Path(path)))


def kind_of_model(model) -> Kind:
    for kind in KINDS:
        if kind.owns(model):
            return kind
    raise ModelFileError(f"{type(model).__name__} is not a control model this extension can run.")


_PANEL_TYPES: dict[tuple, tuple[str, ...] | None] = {}


def panel_types_of(path) -> tuple[str, ...] | None:
    """The panel control types a model file fits by its kind (Kind.panel_types), None where its name must tell
    or it cannot be read; cached per file version, since the panel asks on every control-type change."""
    path = Path(path)
    try:
        stat = (path / "config.json").stat() if path.is_dir() else path.stat()
    except OSError:
        return None
    key = (str(path), stat.st_size, stat.st_mtime_ns)
    if key not in _PANEL_TYPES:
        try:
            keys = file_keys(path)
            _PANEL_TYPES[key] = kind_of_keys(keys).panel_types(keys)
        except (ModelFileError, OSError, ValueError):
            _PANEL_TYPES[key] = None
    return _PANEL_TYPES[key]


def load_control_model(path, dtype=None, device="cpu"):
    """Any supported control model file or folder, loaded by its kind; a one-sentence ModelFileError otherwise."""
    path = Path(path)
    keys = file_keys(path)
    return kind_of_keys(keys).load(path, keys, dtype=dtype, device=device)
