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


class ConfigError(UserError):
    """A training setting that cannot work; the message names the setting."""


PRECISIONS = ("no", "fp16", "bf16")
PREDICTION_TYPES = ("auto", "epsilon", "v_prediction")
DATASET_FORMATS = ("auto", "parquet", "hf_disk", "folder")
CROPS = ("center", "random")
SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial")


@dataclasses.dataclass
class TrainConfig:
    # --- data
    dataset: str = ""  # dataset folder: the Dataset tab's output, a `save_to_disk` dataset, or images/ + conditioning/
    dataset_format: str = "auto"
    image_column: str = "image"
    conditioning_image_column: str = "conditioning_image"
    caption_column: str = "text"
    resolution: int = 512
    crop: str = "center"
    random_flip: bool = False
    aspect_buckets: bool = False
    proportion_empty_prompts: float = 0.0
    max_train_samples: typing.Optional[int] = None
    dataloader_num_workers: int = 0
    # --- models
    base: str = ""  # diffusers folder or single-file SD checkpoint (.safetensors/.ckpt)
    base_config: str = ""  # diffusers-style config folder for a single-file base (offline); "" = look it up
    controlnet: str = ""  # existing ControlNet (file or diffusers folder) to fine-tune; "" = copy of the UNet encoder
    prediction_type: str = "auto"
    # --- optimisation
    output_dir: str = "train-output"
    max_train_steps: typing.Optional[int] = None  # wins over num_train_epochs when set
    num_train_epochs: int = 1
    train_batch_size: int = 4
    gradient_accumulation_steps: int = 1
    learning_rate: float = 1e-5
    lr_scheduler: str = "constant"
    lr_warmup_steps: int = 0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_weight_decay: float = 1e-2
    adam_epsilon: float = 1e-8
    max_grad_norm: float = 1.0
    use_8bit_adam: bool = False
    seed: int = 0
    mixed_precision: str = "no"
    gradient_checkpointing: bool = False
    sd_locked: bool = True  # False also trains the UNet decoder, as lllyasviel's sd_locked=False
    cache_latents: bool = False
    cache_text_embeddings: bool = False
    # --- checkpoints
    checkpointing_steps: int = 500
    checkpoints_total_limit: int = 3
    resume_from: str = ""  # "", "latest" or a checkpoint folder
    # --- validation
    validation_steps: int = 0  # 0 = only at the end (when pairs are given)
    validation_prompts: list = dataclasses.field(default_factory=list)
    validation_images: list = dataclasses.field(default_factory=list)
    validation_inference_steps: int = 20
    validation_seed: int = 0
    fidelity_samples: int = 4  # dataset rows held out of training and scored for control fidelity; 0 = off
    fidelity_module: str = ""  # preprocessor that re-detects the condition; "" = the one the dataset was built with
    # --- export
    export_dir: str = ""  # ControlNet models folder; "" = the extension's models folder
    export_name: str = ""  # file stem; "" = controlnet-<dataset>-<steps>
    export_dtype: str = "fp16"
    export_diffusers: bool = False

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
                       prediction_type=PREDICTION_TYPES, lr_scheduler=SCHEDULERS, export_dtype=("fp16", "fp32"))
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
    hints = typing.get_type_hints(TrainConfig)
    for name in TrainConfig.field_names():
        flag = "--" + name.replace("_", "-")
        if hints[name] is list:
            parser.add_argument(flag, dest=name, action="append", default=None, metavar="VALUE",
                                help="repeat for several")
        else:
            parser.add_argument(flag, dest=name, default=None, metavar="VALUE")


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    values = TrainConfig.from_file(args.config).to_dict() if getattr(args, "config", None) else {}
    for name in TrainConfig.field_names():
        given = getattr(args, name, None)
        if given is not None:
            values[name] = given
    return TrainConfig.from_dict(values)
