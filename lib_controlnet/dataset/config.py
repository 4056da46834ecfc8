"""BuildConfig: every option of a dataset build, in one object the CLI, the UI, yaml and json all fill.

The same dataclass is stored in manifest.json, so a build can be repeated or resumed from its own manifest.
"""
from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any, Optional

from lib_controlnet.errors import UserError

CAPTION_MODES = ("source", "blip", "both")
RESIZE_MODES = ("no", "border", "keep_ratio", "keep_ratio_largest", "center_crop")
ENCODE_FORMATS = ("jpg", "png", "webp")
DISTRIBUTORS = ("multiprocessing", "pyspark", "ray")
MODALITIES = ("image", "text")


class ConfigError(UserError):
    """A build option is missing, unknown or out of range."""


def _list() -> Any:
    return dataclasses.field(default_factory=list)


@dataclasses.dataclass
class BuildConfig:
    out_dir: str = ""

    # -- sources (any combination; results are merged and deduplicated by url) --
    knn_url: Optional[str] = None  # a clip-retrieval backend, e.g. http://host:1234 (the /knn-service route is added)
    prompts: list = _list()
    example_images: list = _list()  # local paths or http(s) URLs sent as `image`/`image_url` queries
    template: Optional[str] = None  # e.g. "{style} {room}, interior design"
    template_values: dict = dataclasses.field(default_factory=dict)  # {"style": [...], "room": [...]}
    num_images: int = 40  # per query
    indice_name: str = "laion5B-L-14"
    modality: str = "image"
    aesthetic_score: Optional[int] = None
    aesthetic_weight: float = 0.5
    deduplicate: bool = True
    use_safety_model: bool = True
    use_violence_detector: bool = True
    use_mclip: bool = False
    knn_timeout: float = 60.0

    url_list: Optional[str] = None  # parquet / csv / jsonl
    url_col: str = "url"
    caption_col: str = "caption"
    include_keywords: list = _list()  # keep a row only if its caption holds one of these (case-insensitive)
    exclude_keywords: list = _list()  # drop a row whose caption holds any of these

    image_dir: Optional[str] = None  # local images, captions from <stem>.txt beside them
    hf_dataset_dir: Optional[str] = None  # a datasets.save_to_disk folder
    hf_image_col: str = "image"
    hf_caption_col: str = "text"

    max_samples: Optional[int] = None  # cap on candidates after merging

    # -- download (img2dataset) --
    image_size: int = 512
    resize_mode: str = "center_crop"
    resize_only_if_bigger: bool = False
    min_image_size: int = 0
    max_aspect_ratio: Optional[float] = None
    encode_format: str = "jpg"
    encode_quality: int = 95
    retries: int = 1
    timeout: float = 10.0
    thread_count: int = 16
    processes_count: int = 1
    samples_per_shard: int = 1000
    distributor: str = "multiprocessing"
    allow_private_urls: bool = False  # also allowed when the extension setting allow_private_urls is on
    max_image_bytes: int = 32 * 1024 * 1024
    max_image_pixels: int = 89_478_485  # Pillow's own bomb threshold
    user_agent_token: str = "img2dataset"
    disallowed_header_directives: list = dataclasses.field(
        default_factory=lambda: ["noai", "noimageai", "noindex", "noimageindex"]
    )

    # -- captions --
    caption_mode: str = "source"
    captioner_path: Optional[str] = None  # local BLIP folder (BlipForConditionalGeneration + processor)
    caption_batch_size: int = 8
    caption_max_tokens: int = 30

    # -- conditioning --
    module: str = "canny"
    module_resolution: Optional[int] = None  # the preprocessor's resolution; None: image_size
    threshold_a: Optional[float] = None
    threshold_b: Optional[float] = None

    # -- output --
    preview_count: int = 16

    @classmethod
    def from_dict(cls, data: dict) -> "BuildConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ConfigError(f"Unknown dataset option(s): {', '.join(unknown)}.")
        return cls(**data).validated()

    @classmethod
    def from_file(cls, path: str | Path) -> "BuildConfig":
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"Config file {path} does not exist.")
        text = path.read_text("utf-8")
        try:
            if path.suffix.lower() in (".yaml", ".yml"):
                import yaml

                data = yaml.safe_load(text) or {}
            else:
                data = json.loads(text)
        except Exception as error:  # yaml and json raise different types; the user needs the line, not the type
            raise ConfigError(f"Cannot read {path}: {error}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path} must hold a mapping of options, not {type(data).__name__}.")
        return cls.from_dict(data)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def replace(self, **changes) -> "BuildConfig":
        return dataclasses.replace(self, **changes).validated()

    def has_source(self) -> bool:
        return bool(self.url_list or self.image_dir or self.hf_dataset_dir or (self.knn_url and self.queries_given()))

    def queries_given(self) -> bool:
        return bool(self.prompts or self.example_images or self.template)

    def validated(self) -> "BuildConfig":
        def check(ok: bool, message: str) -> None:
            if not ok:
                raise ConfigError(message)

        for name in ("prompts", "example_images", "include_keywords", "exclude_keywords", "disallowed_header_directives"):
            value = getattr(self, name)
            if isinstance(value, str):
                setattr(self, name, [value])
        check(self.caption_mode in CAPTION_MODES, f"caption_mode must be one of {', '.join(CAPTION_MODES)}.")
        check(self.resize_mode in RESIZE_MODES, f"resize_mode must be one of {', '.join(RESIZE_MODES)}.")
        check(self.encode_format in ENCODE_FORMATS, f"encode_format must be one of {', '.join(ENCODE_FORMATS)}.")
        check(self.distributor in DISTRIBUTORS, f"distributor must be one of {', '.join(DISTRIBUTORS)}.")
        check(self.modality in MODALITIES, f"modality must be one of {', '.join(MODALITIES)}.")
        check(self.image_size >= 8, "image_size must be at least 8 pixels.")
        check(self.num_images >= 1, "num_images must be at least 1.")
        check(self.thread_count >= 1 and self.processes_count >= 1, "thread_count and processes_count must be >= 1.")
        # img2dataset derives sample keys from log10(samples_per_shard): with 1 they would collide
        check(self.samples_per_shard >= 2, "samples_per_shard must be at least 2.")
        check(self.timeout > 0, "timeout must be positive.")
        check(self.retries >= 0, "retries cannot be negative.")
        check(self.max_image_bytes > 0 and self.max_image_pixels > 0, "max_image_bytes and max_image_pixels must be positive.")
        check(self.max_aspect_ratio is None or self.max_aspect_ratio >= 1, "max_aspect_ratio must be at least 1.")
        check(self.max_samples is None or self.max_samples >= 1, "max_samples must be at least 1.")
        check(
            self.caption_mode == "source" or bool(self.captioner_path),
            f"caption_mode '{self.caption_mode}' needs captioner_path: a local BLIP model folder.",
        )
        check(isinstance(self.template_values, dict), "template_values must map placeholder names to lists of words.")
        return self

    def require_runnable(self) -> None:
        if not self.out_dir:
            raise ConfigError("Set an output folder (out_dir / --out).")
        if not self.has_source():
            raise ConfigError(
                "Give at least one source: a knn backend URL with prompts or example images, a URL list, "
                "an image folder or a Hugging Face dataset folder."
            )

    @property
    def aspect_limit(self) -> float:
        return math.inf if self.max_aspect_ratio is None else float(self.max_aspect_ratio)


# CLI flags for every field: the few the brief names get short, familiar spellings; lists repeat.
FLAG_ALIASES = {"out_dir": "--out", "prompts": "--prompt", "example_images": "--example-image"}


def add_cli_arguments(parser) -> None:
    import argparse

    for field in dataclasses.fields(BuildConfig):
        flag = FLAG_ALIASES.get(field.name, "--" + field.name.replace("_", "-"))
        default = BuildConfig.__dataclass_fields__[field.name]
        sample = default.default if default.default is not dataclasses.MISSING else default.default_factory()
        kwargs: dict[str, Any] = {"dest": field.name, "default": argparse.SUPPRESS}
        if isinstance(sample, bool):
            kwargs["action"] = argparse.BooleanOptionalAction
        elif isinstance(sample, list):
            kwargs["action"] = "append"
        elif isinstance(sample, dict):
            kwargs["type"] = json.loads
            kwargs["help"] = "JSON object"
        elif isinstance(sample, (int, float)) and not isinstance(sample, bool):
            kwargs["type"] = type(sample)
        elif field.name in ("max_aspect_ratio", "threshold_a", "threshold_b"):
            kwargs["type"] = float
        elif field.name in ("aesthetic_score", "max_samples", "module_resolution"):
            kwargs["type"] = int
        parser.add_argument(flag, **kwargs)


def config_from_args(args) -> BuildConfig:
    """File first (if --config was given), then every flag the user actually typed on top."""
    base = BuildConfig.from_file(args.config).to_dict() if getattr(args, "config", None) else {}
    names = {f.name for f in dataclasses.fields(BuildConfig)}
    for name, value in vars(args).items():
        if name in names:
            base[name] = value
    return BuildConfig.from_dict(base)
