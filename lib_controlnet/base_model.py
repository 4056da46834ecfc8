"""The Stable Diffusion base model, loaded offline as a diffusers pipeline from a diffusers folder or a single-file
ldm/sgm checkpoint (with the configs and tokenizers the project ships). Shared by generation and training.

A base architecture is one `Architecture` entry: how its files are recognised, its shipped config folder, its
diffusers pipelines and local tokenizers. Files of other models users also have (SDXL refiner, SD3, Flux) are
recognised only to be refused with a sentence that names them.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Callable, Optional

import torch

from lib_controlnet.errors import UserError
from lib_controlnet.settings import SHIPPED_CONFIGS_DIR

BASE_CONFIGS_DIR = SHIPPED_CONFIGS_DIR / "base"
UNET_PREFIX = "model.diffusion_model."
V_PRED_MARKER = "v_pred"  # an empty tensor v-prediction fine-tunes (NoobAI-XL v-pred and others) carry
ZERO_SNR_MARKER = "ztsnr"  # beside it when the schedule was rescaled to zero terminal SNR


class BaseModelError(UserError):
    """The base checkpoint cannot be used (missing, wrong kind, unsupported family)."""


def _attention_projection_shape(shapes: dict) -> Optional[tuple]:
    return shapes.get(UNET_PREFIX + "input_blocks.1.1.proj_in.weight")


def _is_sdxl(shapes: dict) -> bool:
    return (UNET_PREFIX + "label_emb.0.0.weight" in shapes
            and "conditioner.embedders.0.transformer.text_model.embeddings.position_embedding.weight" in shapes
            and "conditioner.embedders.1.model.positional_embedding" in shapes)


def _is_sd2(shapes: dict) -> bool:
    shape = _attention_projection_shape(shapes)
    return shape is not None and len(shape) == 2 and not any(k.startswith("conditioner.") for k in shapes)


def _is_sd15(shapes: dict) -> bool:
    shape = _attention_projection_shape(shapes)
    return shape is not None and len(shape) == 4


def _sd_tokenizers() -> dict:
    from lib_controlnet import tiny_models

    return {"tokenizer": tiny_models.tokenizer()}


def _sdxl_tokenizers() -> dict:
    from lib_controlnet import tiny_models

    return {"tokenizer": tiny_models.tokenizer(), "tokenizer_2": tiny_models.tokenizer_2()}


@dataclasses.dataclass(frozen=True)
class Architecture:
    family: str  # also the shipped config folder's name under configs/base
    label: str
    pipeline: str  # diffusers pipeline class for plain generation
    controlnet_pipeline: str  # ... and with a ControlNet (the reference in tests, validation images)
    recognise: Callable[[dict], bool]  # from a single file's {key: shape}
    tokenizers: Callable[[], dict]  # built locally: the shipped configs hold no tokenizer files
    controlnet_bases: tuple  # the ControlNet bases (models.configs.BASES) made for it

    @property
    def config_dir(self) -> Path:
        return BASE_CONFIGS_DIR / self.family

    @property
    def is_sdxl(self) -> bool:
        return self.family == "sdxl"

    def pipeline_class(self, controlnet: bool = False):
        import diffusers

        return getattr(diffusers, self.controlnet_pipeline if controlnet else self.pipeline)


ARCHITECTURES = {a.family: a for a in (
    Architecture("sdxl", "SDXL", "StableDiffusionXLPipeline", "StableDiffusionXLControlNetPipeline", _is_sdxl,
                 _sdxl_tokenizers, ("sdxl", "sdxl_mid", "sdxl_small")),
    Architecture("sd2", "SD2.x", "StableDiffusionPipeline", "StableDiffusionControlNetPipeline", _is_sd2,
                 _sd_tokenizers, ("sd2",)),
    Architecture("sd15", "SD1.x", "StableDiffusionPipeline", "StableDiffusionControlNetPipeline", _is_sd15,
                 _sd_tokenizers, ("sd15",)),
)}

# Checkpoints users have that are not a base this project can put a ControlNet on: (recogniser, sentence).
NOT_A_BASE = (
    (lambda s: "conditioner.embedders.0.model.text_projection" in s and not _is_sdxl(s),
     "{name} is an SDXL refiner checkpoint (one OpenCLIP text encoder, aesthetic-score conditioning); ControlNets "
     "need an SDXL base model such as SDXL 1.0 base or one of its fine-tunes."),
    (lambda s: any(k.startswith((UNET_PREFIX + "joint_blocks.", "joint_blocks.")) for k in s),
     "{name} is a Stable Diffusion 3 (MMDiT) checkpoint; this extension works with SD1.x, SD2.x and SDXL bases."),
    (lambda s: any(k.startswith((UNET_PREFIX + "double_blocks.", "double_blocks.")) for k in s),
     "{name} is a Flux checkpoint; this extension works with SD1.x, SD2.x and SDXL bases."),
    (lambda s: any(k.startswith("control_model.") or k.startswith("controlnet_cond_embedding.") for k in s),
     "{name} is a ControlNet, not a base model; put it in the ControlNet models folder and pick a Stable "
     "Diffusion checkpoint as the base."),
)

# diffusers folders: model_index.json's class -> a sentence, for pipelines that are not bases we take
FOLDER_NOT_A_BASE = {
    "StableDiffusion3Pipeline": "{name} is a Stable Diffusion 3 folder; this extension works with SD1.x, SD2.x "
                                "and SDXL bases.",
    "FluxPipeline": "{name} is a Flux folder; this extension works with SD1.x, SD2.x and SDXL bases.",
}


def detect_architecture(shapes: dict, name: str = "The base file") -> Architecture:
    """The base architecture of a single-file checkpoint, from its keys and shapes alone."""
    for recognise, sentence in NOT_A_BASE:
        if recognise(shapes):
            raise BaseModelError(sentence.format(name=name))
    for architecture in ARCHITECTURES.values():
        if architecture.recognise(shapes):
            return architecture
    if any(k.startswith(UNET_PREFIX) for k in shapes):
        raise BaseModelError(f"{name} holds a UNet (model.diffusion_model.*) of no known Stable Diffusion layout, "
                             "or its text encoders are missing.")
    raise BaseModelError(f"{name} holds no Stable Diffusion UNet (model.diffusion_model.*).")


def detect_family(keys_and_shapes: dict) -> str:
    return detect_architecture(keys_and_shapes).family


def folder_architecture(path: Path) -> Architecture:
    """The architecture of a diffusers folder, from its model_index.json and UNet config."""
    index = json.loads((path / "model_index.json").read_text(encoding="utf-8"))
    sentence = FOLDER_NOT_A_BASE.get(index.get("_class_name", ""))
    if sentence:
        raise BaseModelError(sentence.format(name=path.name))
    unet_config = path / "unet" / "config.json"
    if not unet_config.is_file():
        raise BaseModelError(f"{path.name} has no unet/config.json, so it is no Stable Diffusion folder.")
    config = json.loads(unet_config.read_text(encoding="utf-8"))
    if config.get("addition_embed_type") == "text_time":
        if not (index.get("text_encoder") or [None])[0]:
            raise BaseModelError(FOLDER_REFINER.format(name=path.name))
        return ARCHITECTURES["sdxl"]
    return ARCHITECTURES["sd2" if config.get("use_linear_projection") else "sd15"]


FOLDER_REFINER = ("{name} is an SDXL refiner folder (one text encoder, aesthetic-score conditioning); ControlNets "
                  "need an SDXL base model.")


def pipeline_architecture(pipe) -> Architecture:
    """The architecture of a loaded pipeline (what `load_pipeline` returned, or one built in memory)."""
    config = pipe.unet.config
    if getattr(config, "addition_embed_type", None) == "text_time":
        return ARCHITECTURES["sdxl"]
    return ARCHITECTURES["sd2" if getattr(config, "use_linear_projection", False) else "sd15"]


def _apply_prediction_type(pipe, prediction_type: str, markers: dict) -> None:
    """`prediction_type` "auto" takes the file's markers (else the config's); any other value wins."""
    updates = {}
    if prediction_type not in ("", "auto", None):
        updates["prediction_type"] = prediction_type
    elif V_PRED_MARKER in markers:
        updates["prediction_type"] = "v_prediction"
    if ZERO_SNR_MARKER in markers and "rescale_betas_zero_snr" in pipe.scheduler.config:
        updates["rescale_betas_zero_snr"] = True
    if updates:
        pipe.scheduler = type(pipe.scheduler).from_config({**pipe.scheduler.config, **updates})


def load_pipeline(path, config: Optional[str] = None, dtype=torch.float32, prediction_type: str = "auto"):
    """The architecture's diffusers pipeline from a diffusers folder or a single-file checkpoint, offline."""
    path = Path(path).expanduser()
    if not path.exists():
        raise BaseModelError(f"Base model {path} does not exist.")
    common = dict(torch_dtype=dtype)
    if path.is_dir():
        if not (path / "model_index.json").exists():
            raise BaseModelError(f"{path} is a folder without model_index.json, so not a diffusers model.")
        architecture = folder_architecture(path)
        if not architecture.is_sdxl:
            common.update(safety_checker=None, requires_safety_checker=False)
        pipe = architecture.pipeline_class().from_pretrained(str(path), local_files_only=True, **common)
        _apply_prediction_type(pipe, prediction_type, {})
        return pipe
    from lib_controlnet.models.loading import read_header
    from lib_controlnet.models.errors import ModelFileError

    try:
        shapes = read_header(path).shapes
    except ModelFileError as error:
        raise BaseModelError(str(error)) from None
    architecture = detect_architecture(shapes, path.name)
    config = str(config or architecture.config_dir)
    if not architecture.is_sdxl:
        common.update(safety_checker=None, requires_safety_checker=False)
    for name, tokenizer in architecture.tokenizers().items():
        if not (Path(config) / name).is_dir():  # the shipped configs hold none: SD shares CLIP's vocabulary
            common[name] = tokenizer
    try:
        pipe = architecture.pipeline_class().from_single_file(str(path), config=config, local_files_only=True,
                                                              **common)
    except (OSError, ValueError, RuntimeError, KeyError) as error:
        reason = str(error).strip().splitlines()[0][:200] if str(error).strip() else type(error).__name__
        raise BaseModelError(f"Could not load {path.name} as {architecture.label} with the config in {config} "
                             f"({reason}); pass --base-config (base_config in a training config) with a diffusers "
                             f"config folder that matches it.") from None
    _apply_prediction_type(pipe, prediction_type, {k: v for k, v in shapes.items() if "." not in k})
    _fix_position_ids(pipe)
    return pipe


def _fix_position_ids(pipe) -> None:
    """Some pruned checkpoints store CLIP's position_ids buffer cast to fp16/fp32 with the weights (or rounded);
    it is always 0..76, and embedding lookups need it as integers."""
    for name in ("text_encoder", "text_encoder_2"):
        embeddings = getattr(getattr(getattr(pipe, name, None), "text_model", None), "embeddings", None)
        ids = getattr(embeddings, "position_ids", None)
        if ids is not None and (ids.is_floating_point() or not torch.equal(ids, torch.arange(ids.shape[-1])[None])):
            embeddings.position_ids = torch.arange(ids.shape[-1], device=ids.device).expand(1, -1)
