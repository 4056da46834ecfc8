"""The frozen base model a ControlNet is trained against: VAE, text encoder, tokenizer, UNet, noise schedule.

Loaded offline from a diffusers folder or a single-file SD checkpoint (with a local config folder). Inside the
WebUI, the loaded checkpoint's own ldm UNet weights can replace the file's (they may differ after merges), via
`lib_controlnet.models.unet_ldm_to_diffusers`.
"""
from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path
from typing import Optional

import torch

from lib_controlnet.base_model import BaseModelError, load_pipeline, pipeline_architecture
from lib_controlnet.errors import UserError

SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth")


@dataclasses.dataclass
class BaseModel:
    vae: torch.nn.Module
    text_encoder: torch.nn.Module
    tokenizer: object
    unet: torch.nn.Module
    noise_scheduler: object  # DDPMScheduler with the base's betas and prediction type
    prediction_type: str
    source: Path
    family: str
    text_encoder_2: Optional[torch.nn.Module] = None  # SDXL: OpenCLIP bigG, whose pooled output conditions too
    tokenizer_2: object = None

    @property
    def text_encoders(self) -> list:
        return [e for e in (self.text_encoder, self.text_encoder_2) if e is not None]

    @property
    def is_sdxl(self) -> bool:
        return self.text_encoder_2 is not None

    def text_encoders_to(self, device, dtype=None) -> None:
        for encoder in self.text_encoders:
            encoder.to(device, dtype) if dtype is not None else encoder.to(device)

    def freeze(self) -> None:
        for part in (self.vae, *self.text_encoders, self.unet):
            part.requires_grad_(False)
            part.eval()


def load_base(path, config_dir: str = "", prediction_type: str = "auto",
              ldm_unet_state_dict: dict | None = None) -> BaseModel:
    from diffusers import DDPMScheduler

    source = Path(path).expanduser() if path else None
    if source is None or not source.exists():
        raise BaseModelError(f"Base model {path!r} does not exist (give a diffusers folder or an SD checkpoint file).")
    if source.is_file() and source.suffix.lower() not in SINGLE_FILE_SUFFIXES:
        raise BaseModelError(f"Base model {source.name} is neither a diffusers folder nor a checkpoint file.")
    try:
        pipe = load_pipeline(source, config_dir or None, prediction_type=prediction_type)
    except UserError:
        raise
    except Exception as error:
        raise BaseModelError(f"Base model {source} could not be loaded: {error}") from None
    if ldm_unet_state_dict is not None:
        from lib_controlnet.models import unet_ldm_to_diffusers

        missing, unexpected = pipe.unet.load_state_dict(unet_ldm_to_diffusers(ldm_unet_state_dict), strict=False)
        if missing:
            raise BaseModelError(f"The loaded checkpoint's UNet does not fit the base config ({len(missing)} "
                                 "weights missing).")
    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    if prediction_type != "auto":
        scheduler.register_to_config(prediction_type=prediction_type)
    architecture = pipeline_architecture(pipe)
    base = BaseModel(pipe.vae, pipe.text_encoder, pipe.tokenizer, pipe.unet, scheduler,
                     scheduler.config.prediction_type, source, architecture.family,
                     getattr(pipe, "text_encoder_2", None), getattr(pipe, "tokenizer_2", None))
    base.freeze()
    return base


def base_hash(path) -> str:
    """sha256 of the base's weights (the single file, or the folder's UNet weights), as the WebUI shows it."""
    path = Path(path)
    if not path.exists():
        return ""
    if path.is_dir():
        files = sorted((path / "unet").glob("*.safetensors")) or sorted((path / "unet").glob("*.bin"))
        if not files:
            return ""
        path = files[0]
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
