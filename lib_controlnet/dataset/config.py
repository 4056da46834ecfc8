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


def _option(default, help: str, factory: bool = False) -> Any:
    """A field and its one-line `help`, the one place a flag's description (`dataset build --help`) is written."""
    if factory:
        return dataclasses.field(default_factory=default, metadata={"help": help})
    return dataclasses.field(default=default, metadata={"help": help})


def _list(help: str) -> Any:
    return _option(list, help, factory=True)


@dataclasses.dataclass
class BuildConfig:
    out_dir: str = _option("", "folder the dataset is written to (and resumed from)")

    # -- sources (any combination; results are merged and deduplicated by url) --
    knn_url: Optional[str] = _option(
        None, "clip-retrieval backend to query, e.g. http://host:1234 (the /knn-service route is added), or a local "
              "index folder made by `dataset index build`")
    prompts: list = _list("text query for the knn backend; repeat for several")
    example_images: list = _list("image (local path or http(s) URL) to find similar images to; repeat for several")
    template: Optional[str] = _option(
        None, 'query template with {placeholders}, e.g. "{style} {room}, interior design"')
    template_values: dict = _option(
        dict, 'words for each template placeholder, as JSON: {"style": ["modern"], "room": ["kitchen"]}', factory=True)
    num_images: int = _option(40, "images asked of the knn backend per query")
    indice_name: str = _option("laion5B-L-14", "index of the knn backend to query")
    modality: str = _option("image", "what the knn backend searches: " + ", ".join(MODALITIES))
    aesthetic_score: Optional[int] = _option(
        None, "knn backend's aesthetic score to favour (its aesthetic filter)")
    aesthetic_weight: float = _option(0.5, "weight of the aesthetic score in the knn query")
    deduplicate: bool = _option(True, "ask the knn backend to drop near-duplicate images")
    use_safety_model: bool = _option(True, "ask the knn backend to drop unsafe images")
    use_violence_detector: bool = _option(True, "ask the knn backend to drop violent images")
    use_mclip: bool = _option(False, "use the knn backend's multilingual CLIP for text queries")
    knn_timeout: float = _option(60.0, "seconds to wait for each knn query")

    url_list: Optional[str] = _option(None, "parquet, csv or jsonl file of image URLs (and captions)")
    url_col: str = _option("url", "URL column of the URL list")
    caption_col: str = _option("caption", "caption column of the URL list")
    include_keywords: list = _list(
        "keep a URL-list row only if its caption holds one of these words; repeat for several")
    exclude_keywords: list = _list("drop a URL-list row whose caption holds any of these words; repeat for several")

    image_dir: Optional[str] = _option(None, "folder of local images; captions come from <stem>.txt files beside them")
    hf_dataset_dir: Optional[str] = _option(None, "a Hugging Face dataset folder saved with save_to_disk")
    hf_image_col: str = _option("image", "image column of the Hugging Face dataset")
    hf_caption_col: str = _option("text", "caption column of the Hugging Face dataset")

    max_samples: Optional[int] = _option(None, "keep at most this many candidates after merging the sources")

    # -- download (img2dataset) --
    image_size: int = _option(512, "size in pixels the images are resized to")
    resize_mode: str = _option("center_crop", "how images are resized: " + ", ".join(RESIZE_MODES))
    resize_only_if_bigger: bool = _option(False, "resize only images larger than image_size")
    min_image_size: int = _option(0, "drop images whose smaller side is below this many pixels")
    max_aspect_ratio: Optional[float] = _option(None, "drop images more elongated than this ratio, empty: keep all")
    encode_format: str = _option("jpg", "format the images are stored in: " + ", ".join(ENCODE_FORMATS))
    encode_quality: int = _option(95, "JPEG/WebP quality of the stored images")
    retries: int = _option(1, "download retries per image")
    timeout: float = _option(10.0, "seconds to wait for each image download")
    thread_count: int = _option(16, "download threads per process")
    processes_count: int = _option(1, "download processes")
    samples_per_shard: int = _option(1000, "samples per download shard (and per parquet file)")
    distributor: str = _option("multiprocessing", "how img2dataset spreads its work: " + ", ".join(DISTRIBUTORS))
    allow_private_urls: bool = _option(
        False, "allow downloads from loopback and private networks (also on when the extension setting is)")
    max_image_bytes: int = _option(32 * 1024 * 1024, "drop images larger than this many bytes")
    max_image_pixels: int = _option(89_478_485, "drop images with more pixels than this (decompression bomb guard)")
    user_agent_token: str = _option("img2dataset", "token added to the downloader's User-Agent")
    disallowed_header_directives: list = _option(
        lambda: ["noai", "noimageai", "noindex", "noimageindex"],
        "X-Robots-Tag directives that make a site's images off limits; repeat for several", factory=True)

    # -- captions --
    caption_mode: str = _option(
        "source", "which caption trains: " + ", ".join(CAPTION_MODES) + " (blip and both need captioner_path)")
    captioner_path: Optional[str] = _option(
        None, "local BLIP model folder (BlipForConditionalGeneration and its processor)")
    caption_batch_size: int = _option(8, "images captioned per BLIP batch")
    caption_max_tokens: int = _option(30, "longest BLIP caption, in tokens")

    # -- conditioning --
    module: str = _option("canny", "preprocessor that makes the conditioning images (see detect --list)")
    module_resolution: Optional[int] = _option(None, "the preprocessor's resolution, empty: image_size")
    threshold_a: Optional[float] = _option(None, "the preprocessor's first parameter, empty: its default")
    threshold_b: Optional[float] = _option(None, "the preprocessor's second parameter, empty: its default")

    # -- output --
    preview_count: int = _option(16, "image/map pairs saved under preview/ to look at")

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
        if self.module_resolution is not None:
            from lib_controlnet.preprocess import resolution_error  # the one range every surface checks

            problem = resolution_error(self.module_resolution)
            check(problem is None, f"module_resolution {problem}.")
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

    from lib_controlnet.flag_help import flag_help

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
        elif isinstance(sample, (int, float)) and not isinstance(sample, bool):
            kwargs["type"] = type(sample)
        elif field.name in ("max_aspect_ratio", "threshold_a", "threshold_b"):
            kwargs["type"] = float
        elif field.name in ("aesthetic_score", "max_samples", "module_resolution"):
            kwargs["type"] = int
        parser.add_argument(flag, help=flag_help(field), **kwargs)


def config_from_args(args) -> BuildConfig:
    """File first (if --config was given), then every flag the user actually typed on top."""
    base = BuildConfig.from_file(args.config).to_dict() if getattr(args, "config", None) else {}
    names = {f.name for f in dataclasses.fields(BuildConfig)}
    for name, value in vars(args).items():
        if name in names:
            base[name] = value
    return BuildConfig.from_dict(base)
