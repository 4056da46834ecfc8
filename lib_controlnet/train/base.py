"""The frozen base model a ControlNet is trained against: VAE, text encoder, tokenizer, UNet, noise schedule.

Loaded offline from a diffusers folder or a single-file SD checkpoint (with a local config folder). Inside the
WebUI, the loaded checkpoint's own ldm UNet weights can replace the file's (they may differ after merges), via
`lib_controlnet.models.unet_ldm_to_diffusers`.
"""
from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path

import torch

from lib_controlnet.errors import UserError
from lib_controlnet.settings import SHIPPED_CONFIGS_DIR

SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth")


class BaseModelError(UserError):
    """The base model cannot be loaded."""


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

    def freeze(self) -> None:
        for part in (self.vae, self.text_encoder, self.unet):
            part.requires_grad_(False)
            part.eval()


def load_base(path, config_dir: str = "", prediction_type: str = "auto",
              ldm_unet_state_dict: dict | None = None) -> BaseModel:
    from diffusers import DDPMScheduler

    source = Path(path).expanduser() if path else None
    if source is None or not source.exists():
        raise BaseModelError(f"Base model {path!r} does not exist (give a diffusers folder or an SD checkpoint file).")
    try:
        if source.is_dir():
            parts = _load_folder(source)
        elif source.suffix.lower() in SINGLE_FILE_SUFFIXES:
            parts = _load_single_file(source, config_dir)
        else:
            raise BaseModelError(f"Base model {source.name} is neither a diffusers folder nor a checkpoint file.")
    except UserError:
        raise
    except Exception as error:
        raise BaseModelError(f"Base model {source} could not be loaded: {error}") from None
    if getattr(parts["unet"].config, "addition_embed_type", None) == "text_time":
        raise BaseModelError("SDXL bases are not supported by the trainer yet; use an SD1.x or SD2.x base.")
    if ldm_unet_state_dict is not None:
        from lib_controlnet.models import unet_ldm_to_diffusers

        missing, unexpected = parts["unet"].load_state_dict(unet_ldm_to_diffusers(ldm_unet_state_dict), strict=False)
        if missing:
            raise BaseModelError(f"The loaded checkpoint's UNet does not fit the base config ({len(missing)} "
                                 "weights missing).")
    scheduler = DDPMScheduler.from_config(parts["scheduler"].config)
    if prediction_type != "auto":
        scheduler.register_to_config(prediction_type=prediction_type)
    family = "sd2" if parts["unet"].config.cross_attention_dim == 1024 else "sd15"
    base = BaseModel(parts["vae"], parts["text_encoder"], parts["tokenizer"], parts["unet"], scheduler,
                     scheduler.config.prediction_type, source, family)
    base.freeze()
    return base


def _load_folder(folder: Path) -> dict:
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    if not (folder / "unet").is_dir():
        raise BaseModelError(f"{folder} is not a diffusers model folder (it has no unet/ subfolder).")
    local = dict(local_files_only=True)
    return dict(
        unet=UNet2DConditionModel.from_pretrained(folder, subfolder="unet", **local),
        vae=AutoencoderKL.from_pretrained(folder, subfolder="vae", **local),
        text_encoder=CLIPTextModel.from_pretrained(folder, subfolder="text_encoder", **local),
        tokenizer=CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer", **local),
        scheduler=DDPMScheduler.from_pretrained(folder, subfolder="scheduler", **local),
    )


def _load_single_file(path: Path, config_dir: str) -> dict:
    from diffusers import StableDiffusionPipeline

    config = Path(config_dir) if config_dir else SHIPPED_CONFIGS_DIR / "base" / _checkpoint_family(path)
    if not (config / "model_index.json").is_file():
        raise BaseModelError(f"No local config for {path.name}: set base_config to a diffusers-style folder "
                             "(model_index.json and per-part configs) for this model family.")
    extra = {}
    if not (config / "tokenizer").is_dir():  # the shipped configs hold none: SD1/SD2 share CLIP's vocabulary
        from lib_controlnet.tiny_models import tokenizer

        extra["tokenizer"] = tokenizer()
    pipe = StableDiffusionPipeline.from_single_file(str(path), config=str(config), local_files_only=True,
                                                    safety_checker=None, requires_safety_checker=False, **extra)
    return dict(unet=pipe.unet, vae=pipe.vae, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer,
                scheduler=pipe.scheduler)


def _checkpoint_family(path: Path) -> str:
    """sd15 or sd2: SD2's attention projections are linear (2-D weights), SD1's are 1x1 convolutions."""
    key = "model.diffusion_model.input_blocks.1.1.proj_in.weight"
    if path.suffix.lower() == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as handle:
            shape = handle.get_slice(key).get_shape() if key in handle.keys() else None
    else:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
        state = state.get("state_dict", state)
        shape = list(state[key].shape) if key in state else None
    if shape is None:
        raise BaseModelError(f"{path.name} holds no Stable Diffusion UNet (model.diffusion_model.*).")
    return "sd2" if len(shape) == 2 else "sd15"


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
