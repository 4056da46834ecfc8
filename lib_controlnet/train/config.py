"""TrainConfig: every setting of a training run, from a YAML/JSON file, command-line flags or the Train tab.

One flat dataclass, so the same names work everywhere (file keys == `--flag-names` with dashes == UI fields),
and a checkpoint can store the exact config it was trained with.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import typing
from pathlib import Path

from lib_controlnet.errors import UserError
from lib_controlnet.train.controlnet_size import SIZES as CONTROLNET_SIZES


class ConfigError(UserError):
    """A training setting that cannot work; the message names the setting."""


PRECISIONS = ("no", "fp16", "bf16")
PREDICTION_TYPES = ("auto", "epsilon", "v_prediction")
DATASET_FORMATS = ("auto", "parquet", "hf_disk", "folder")
CROPS = ("center", "random")
SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial")


def _setting(default, help: str, factory: bool = False):
    """A field whose `help` (one line) is what `train --help` and the UI show: the one place it is written."""
    if factory:
        return dataclasses.field(default_factory=default, metadata={"help": help})
    return dataclasses.field(default=default, metadata={"help": help})


@dataclasses.dataclass
class TrainConfig:
    # --- data
    dataset: str = _setting(
        "", "dataset folder: the Dataset tab's output, a save_to_disk dataset, or images/ + conditioning/")
    dataset_format: str = _setting("auto", "how to read the dataset folder: " + ", ".join(DATASET_FORMATS))
    image_column: str = _setting("image", "column holding the target images")
    conditioning_image_column: str = _setting("conditioning_image", "column holding the conditioning maps")
    caption_column: str = _setting("text", "column holding the captions")
    resolution: int = _setting(512, "training image size in pixels (a multiple of 8)")
    crop: str = _setting("center", "how images are cropped to the resolution: " + ", ".join(CROPS))
    random_flip: bool = _setting(False, "flip image and map horizontally at random")
    aspect_buckets: bool = _setting(
        False, "batch images of similar aspect ratio together instead of cropping them square")
    proportion_empty_prompts: float = _setting(0.0, "share of captions replaced by the empty prompt (0..1)")
    max_train_samples: typing.Optional[int] = _setting(None, "use at most this many samples of the dataset; empty: all")
    dataloader_num_workers: int = _setting(0, "data loading processes; 0 loads in the training process")
    # --- models
    base: str = _setting("", "base Stable Diffusion model: a diffusers folder or a single .safetensors/.ckpt file")
    base_config: str = _setting("", "diffusers-style config folder for a single-file base (offline); empty: look it up")
    vae: str = _setting(
        "", "VAE file replacing the base's (ldm or diffusers keys, e.g. sdxl-vae-fp16-fix), taken as fp16-safe: it "
        "may run in fp16; empty: the base's own (SDXL's stays fp32)")
    controlnet: str = _setting(
        "", "ControlNet (file or diffusers folder) to fine-tune; empty: start from a copy of the UNet encoder")
    controlnet_size: str = _setting(
        "full", "size of a new ControlNet: full (a copy of the UNet's encoder), or mid / small as the released SDXL "
        "ones (fewer transformer layers); ignored when fine-tuning")
    prediction_type: str = _setting(
        "auto", "what the base model predicts: " + ", ".join(PREDICTION_TYPES) + "; auto reads it from the model")
    # --- optimisation
    output_dir: str = _setting("train-output", "folder for checkpoints, logs, samples and the report")
    max_train_steps: typing.Optional[int] = _setting(
        None, "optimiser steps to train; when set it wins over num_train_epochs")
    num_train_epochs: int = _setting(1, "passes over the dataset (when max_train_steps is not set)")
    train_batch_size: int = _setting(4, "samples per step on each process")
    gradient_accumulation_steps: int = _setting(1, "steps whose gradients are summed before each optimiser update")
    learning_rate: float = _setting(1e-5, "peak learning rate")
    lr_scheduler: str = _setting("constant", "learning-rate schedule: " + ", ".join(SCHEDULERS))
    lr_warmup_steps: int = _setting(0, "steps of linear warm-up at the start of the schedule")
    adam_beta1: float = _setting(0.9, "AdamW beta1")
    adam_beta2: float = _setting(0.999, "AdamW beta2")
    adam_weight_decay: float = _setting(1e-2, "AdamW weight decay")
    adam_epsilon: float = _setting(1e-8, "AdamW epsilon")
    max_grad_norm: float = _setting(1.0, "clip the gradient norm to this value")
    use_8bit_adam: bool = _setting(False, "use bitsandbytes' 8-bit AdamW (needs bitsandbytes and a GPU)")
    seed: int = _setting(0, "random seed of the run")
    mixed_precision: str = _setting("no", "compute precision: " + ", ".join(PRECISIONS))
    gradient_checkpointing: bool = _setting(
        False, "recompute activations in the backward pass: less memory, slower steps")
    sd_locked: bool = _setting(
        True, "keep the UNet frozen; false also trains its decoder, as lllyasviel's sd_locked=False")
    cache_latents: bool = _setting(
        False, "encode every image with the VAE once before training (needs crop=center, no random_flip)")
    cache_text_embeddings: bool = _setting(False, "encode every caption once before training")
    # --- checkpoints
    checkpointing_steps: int = _setting(500, "save a resumable checkpoint every this many steps")
    checkpoints_total_limit: int = _setting(3, "keep at most this many checkpoints; older ones are deleted")
    resume_from: str = _setting("", "resume from a checkpoint folder, or latest; empty: start fresh")
    # --- validation
    validation_steps: int = _setting(0, "sample the validation pairs every this many steps; 0: only at the end")
    validation_prompts: list = _setting(
        list, "validation prompt; repeat for several (one per image, or one for all)", factory=True)
    validation_images: list = _setting(list, "validation conditioning image; repeat for several", factory=True)
    validation_inference_steps: int = _setting(20, "sampling steps of each validation image")
    validation_seed: int = _setting(0, "seed of the validation samples")
    fidelity_samples: int = _setting(
        4, "dataset rows held out of training and scored for control fidelity each validation round; 0: off")
    fidelity_module: str = _setting(
        "", "preprocessor that re-detects the condition on generated images; empty: the one that built the dataset")
    # --- export
    export_dir: str = _setting("", "ControlNet models folder to export into; empty: the extension's models folder")
    export_name: str = _setting("", "exported file name without extension; empty: controlnet-<dataset>-<steps>")
    export_dtype: str = _setting("fp16", "precision of the exported weights: fp16 or fp32")
    export_diffusers: bool = _setting(False, "also export a diffusers folder beside the .safetensors file")

    # ------------------------------------------------------------------ construction
    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_dict(cls, values: dict) -> "TrainConfig":
        unknown = sorted(set(values) - set(cls.field_names()))
        if unknown:
            raise ConfigError(f"Unknown training setting(s): {', '.join(unknown)}.")
        hints = typing.get_type_hints(cls)
        coerced = {name: _coerce(name, hints[name], value) for name, value in values.items()}
        config = cls(**coerced)
        config.validate()
        return config

    @classmethod
    def from_file(cls, path) -> "TrainConfig":
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"Training config file {path} does not exist.")
        text = path.read_text(encoding="utf-8")
        try:
            if path.suffix.lower() == ".json":
                values = json.loads(text)
            else:
                import yaml

                values = yaml.safe_load(text)
        except Exception as error:  # parse errors of either format
            raise ConfigError(f"Training config {path} could not be parsed: {error}") from None
        if not isinstance(values, dict):
            raise ConfigError(f"Training config {path} must hold a mapping of setting: value.")
        return cls.from_dict(values)

    def replace(self, **changes) -> "TrainConfig":
        return TrainConfig.from_dict({**self.to_dict(), **changes})

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def save(self, path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2), encoding="utf-8")

    # ------------------------------------------------------------------ checks
    def validate(self) -> None:
        choices = dict(dataset_format=DATASET_FORMATS, crop=CROPS, mixed_precision=PRECISIONS,
                       prediction_type=PREDICTION_TYPES, lr_scheduler=SCHEDULERS, export_dtype=("fp16", "fp32"),
                       controlnet_size=CONTROLNET_SIZES)
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ConfigError(f"{name} must be one of {', '.join(allowed)}, not {getattr(self, name)!r}.")
        positive = ("resolution", "train_batch_size", "gradient_accumulation_steps", "num_train_epochs",
                    "checkpoints_total_limit", "validation_inference_steps")
        for name in positive:
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1.")
        if self.resolution % 8:
            raise ConfigError(f"resolution must be a multiple of 8 (the VAE downsamples 8x), not {self.resolution}.")
        if self.fidelity_samples < 0:
            raise ConfigError("fidelity_samples must be 0 (off) or more.")
        if self.max_train_steps is not None and self.max_train_steps < 1:
            raise ConfigError("max_train_steps must be at least 1 (or left empty to train by epochs).")
        if not 0.0 <= self.proportion_empty_prompts <= 1.0:
            raise ConfigError("proportion_empty_prompts must lie between 0 and 1.")
        if self.learning_rate <= 0:
            raise ConfigError("learning_rate must be positive.")
        if len(self.validation_prompts) != len(self.validation_images):
            if len(self.validation_prompts) != 1 and len(self.validation_images) != 1:
                raise ConfigError("Give one validation prompt per validation image (or a single one for all).")
        if self.cache_latents and (self.crop == "random" or self.random_flip):
            raise ConfigError("cache_latents needs fixed images: use crop=center and no random_flip.")

    def validation_pairs(self) -> list[tuple[str, str]]:
        prompts, images = list(self.validation_prompts), list(self.validation_images)
        if not images:
            return []
        if len(prompts) == 1 and len(images) > 1:
            prompts = prompts * len(images)
        if len(images) == 1 and len(prompts) > 1:
            images = images * len(prompts)
        return list(zip(prompts, images))


def _coerce(name: str, hint, value):
    """Flags and UI fields arrive as strings; files may hold ints for floats. Turn them into the field's type."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin is typing.Union and type(None) in args:  # Optional[X]
        if value is None or value == "":
            return None
        hint = next(a for a in args if a is not type(None))
    try:
        if hint is bool:
            if isinstance(value, str):
                lowered = value.strip().lower()
                if lowered not in ("true", "false", "1", "0", "yes", "no", "on", "off"):
                    raise ValueError(value)
                return lowered in ("true", "1", "yes", "on")
            return bool(value)
        if hint is int:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            return int(value)
        if hint is float:
            return float(value)
        if hint is str:
            return "" if value is None else str(value)
        if hint is list:
            if value is None:
                return []
            if isinstance(value, str):
                return [value]
            return [str(v) for v in value]
    except (TypeError, ValueError):
        raise ConfigError(f"{name} has an invalid value {value!r}.") from None
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """One `--flag-name` per field; a flag left out keeps the file's (or the default) value."""
    from lib_controlnet.flag_help import flag_help

    hints = typing.get_type_hints(TrainConfig)
    metavars = {bool: "true|false", int: "N", float: "X", list: "VALUE"}
    for field in dataclasses.fields(TrainConfig):
        name = field.name
        flag = "--" + name.replace("_", "-")
        hint = next((a for a in typing.get_args(hints[name]) if a is not type(None)), hints[name])  # Optional[X]
        metavar = metavars.get(hint, "TEXT")
        if hints[name] is list:
            parser.add_argument(flag, dest=name, action="append", default=None, metavar=metavar,
                                help=flag_help(field))
        else:
            parser.add_argument(flag, dest=name, default=None, metavar=metavar, help=flag_help(field))


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    values = TrainConfig.from_file(args.config).to_dict() if getattr(args, "config", None) else {}
    for name in TrainConfig.field_names():
        given = getattr(args, name, None)
        if given is not None:
            values[name] = given
    return TrainConfig.from_dict(values)
