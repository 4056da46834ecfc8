"""Export a trained ControlNet: ldm `control_model.*` safetensors (fp16 or fp32) into a ControlNet models
folder, with training metadata, and optionally a diffusers folder beside it. The writing itself is the models
package's (`save_controlnet_ldm`, `save_controlnet_diffusers`), so every exported file loads where theirs do.
"""
from __future__ import annotations

import dataclasses
import json
import re
import time
from pathlib import Path

from lib_controlnet.errors import UserError
from lib_controlnet.train.config import TrainConfig

METADATA_PREFIX = "controlnet_studio."


class ExportError(UserError):
    """The trained ControlNet cannot be written where asked."""


@dataclasses.dataclass
class ExportRequest:
    out_dir: Path
    name: str
    dtype: str = "fp16"
    diffusers: bool = False
    metadata: dict = dataclasses.field(default_factory=dict)

    @classmethod
    def from_training(cls, config: TrainConfig, steps: int, base_source, dataset_name: str) -> "ExportRequest":
        from lib_controlnet.settings import get_settings
        from lib_controlnet.train.base import base_hash

        out_dir = Path(config.export_dir).expanduser() if config.export_dir else Path(get_settings().model_dirs[0])
        name = config.export_name or f"controlnet-{safe_stem(dataset_name)}-{steps}"
        metadata = {
            "base_model": str(base_source),
            "base_model_sha256": base_hash(base_source) if base_source else "",
            "steps": str(steps),
            "dataset": str(config.dataset),
            "resolution": str(config.resolution),
            "prediction_type": config.prediction_type,
            "arguments": json.dumps(config.to_dict()),
            "trained_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        return cls(out_dir, name, config.export_dtype, config.export_diffusers, metadata)


@dataclasses.dataclass
class Exported:
    file: Path
    diffusers_dir: Path | None = None


def safe_stem(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-.") or "dataset"


def export_controlnet(controlnet, request: ExportRequest) -> Exported:
    from lib_controlnet.models import ModelFileError, save_controlnet_diffusers, save_controlnet_ldm

    metadata = {METADATA_PREFIX + k: v for k, v in request.metadata.items()}
    target = Path(request.out_dir) / f"{safe_stem(request.name)}.safetensors"
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        file = save_controlnet_ldm(controlnet, target, dtype=request.dtype, metadata=metadata)
        folder = None
        if request.diffusers:
            folder = save_controlnet_diffusers(controlnet, target.with_suffix(""), dtype=request.dtype)
    except ModelFileError as error:
        raise ExportError(str(error)) from None
    except OSError as error:
        raise ExportError(f"Cannot write the ControlNet to {target.parent}: {error.strerror or error}.") from None
    return Exported(Path(file), folder)


def export_checkpoint(checkpoint, out, dtype: str = "fp16", diffusers: bool = False) -> Exported:
    """The `export CKPT OUT` command: a training checkpoint (or a training output folder, meaning its newest
    checkpoint) to a .safetensors file (OUT ends in .safetensors) or into a folder (OUT is a folder)."""
    from lib_controlnet.train import checkpoint as ckpt

    source = Path(checkpoint).expanduser()
    if not (source / ckpt.STATE_FILE).is_file():
        latest = ckpt.latest_checkpoint(source)
        if latest is None:
            raise ExportError(f"{checkpoint} is neither a training checkpoint nor a training output folder with one.")
        source = latest
    state = ckpt.read_state(source)
    config = TrainConfig.from_dict(state.get("config", {}))
    controlnet = ckpt.load_controlnet(source)
    request = ExportRequest.from_training(config, state["global_step"], config.base, Path(config.dataset).name)
    out = Path(out).expanduser()
    if out.suffix.lower() == ".safetensors":
        request.out_dir, request.name = out.parent, out.stem
    else:
        request.out_dir = out
    request.dtype, request.diffusers = dtype, diffusers
    if not Path(config.base).exists():  # base moved since training: keep the path, skip the hash
        request.metadata["base_model_sha256"] = ""
    return export_controlnet(controlnet, request)
