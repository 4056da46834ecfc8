"""The dataset folder a build produces, and the only code that writes it.

Layout of DIR (what `datasets.load_dataset(DIR, split="train")`, the Train tab and diffusers'
`train_controlnet.py --train_data_dir DIR` read):

    DIR/README.md                   dataset card; its YAML `configs` lists the "train" split's files by name
    DIR/data/train-<shard>-<sha>.parquet  one file per download shard (names sort in sample order); <sha> is
                                    the first 16 hex digits of the file's SHA-256
    DIR/preview/                    a few `<key>_image.<ext>` / `<key>_conditioning.png` pairs to look at
    DIR/manifest.json               config, counts and per-stage timings of the build
    DIR/failures.jsonl              one {"key", "url", "stage", "reason"} line per sample that was dropped
    DIR/.build/                     resumable work files (hidden: `datasets` ignores it)

Why the names carry a content hash and the card lists them one by one: with a `configs: data_files:` block,
`datasets.load_dataset(DIR)` (and so diffusers' `train_controlnet.py --train_data_dir DIR`) fingerprints its
cache from the card's patterns and the folder's name only: it hashes the builder configs before it resolves
their patterns into files (datasets 5.0.1, load.py LocalDatasetModuleFactory and builder.py
_create_builder_config). With a glob there, a rebuilt folder, or another folder of the same name, reads the
rows cached from the first build. Listed names that change with the bytes make that fingerprint follow the
content, and the same content keeps its cache.

Parquet schema of every shard (the Hugging Face features are stored in the schema metadata, so both image
columns decode to PIL images without further configuration):

    image               Image()   struct{bytes: binary, path: string}; the downloaded, resized image
                                  (JPEG by default, as img2dataset encoded it; `path` is only a name hint)
    conditioning_image  Image()   the preprocessor's map, always lossless PNG, same size as `image`
    text                string    the training caption (see caption.py for which caption it is)
    source_caption      string    caption that came with the source (alt text, .txt file), may be ""
    generated_caption   string    BLIP caption, "" when no captioner ran
    url                 string    where the image came from (http(s) URL, or the local file path)
    similarity          float32   clip-retrieval similarity to the query, NaN for other sources
    width, height       int32     size of `image` in pixels
    source              string    "knn", "local_index", "local_index_file", "url_list", "local_folder" or "hf_disk"
    key                 string    stable sample id, unique in the dataset; rows are sorted by it
"""
from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Iterable, Sequence

from lib_controlnet.dataset.files import atomic_write_json, atomic_write_jsonl, atomic_write_table, atomic_write_text

DATA_DIR = "data"
PREVIEW_DIR = "preview"
MANIFEST = "manifest.json"
FAILURES = "failures.jsonl"
WORK_DIR = ".build"

CARD_BODY = """# ControlNet training dataset

Built by ControlNet Studio. Columns: `image` and `conditioning_image` (Image features), `text` (caption),
plus `source_caption`, `generated_caption`, `url`, `similarity`, `width`, `height`, `source`, `key`.
See `manifest.json` for how it was built and `failures.jsonl` for what was left out and why.
"""


@dataclasses.dataclass
class Sample:
    """One finished row of the dataset."""

    key: str
    image: bytes
    image_ext: str
    conditioning_image: bytes  # PNG
    text: str
    url: str
    width: int
    height: int
    source: str
    similarity: float = math.nan
    source_caption: str = ""
    generated_caption: str = ""


def dataset_features():
    import datasets

    return datasets.Features(
        {
            "image": datasets.Image(),
            "conditioning_image": datasets.Image(),
            "text": datasets.Value("string"),
            "source_caption": datasets.Value("string"),
            "generated_caption": datasets.Value("string"),
            "url": datasets.Value("string"),
            "similarity": datasets.Value("float32"),
            "width": datasets.Value("int32"),
            "height": datasets.Value("int32"),
            "source": datasets.Value("string"),
            "key": datasets.Value("string"),
        }
    )


DIGEST_CHARS = 16


def _shard_name(shard: int | str) -> str:
    return f"{shard:05d}" if isinstance(shard, int) else shard


def shard_files(out_dir: Path, shard: int | str) -> list[Path]:
    """The files written for one shard: one, or none; more only if a run died between rename and clean-up.
    The unhashed name is what builds before content-hashed names wrote, replaced when such a build resumes."""
    folder, name = Path(out_dir) / DATA_DIR, _shard_name(shard)
    hashed = sorted(folder.glob(f"train-{name}-{'[0-9a-f]' * DIGEST_CHARS}.parquet"))
    return hashed + [p for p in [folder / f"train-{name}.parquet"] if p.exists()]


def samples_to_table(samples: Sequence[Sample]):
    import pyarrow as pa

    ordered = sorted(samples, key=lambda s: s.key)
    columns = {
        "image": [{"bytes": s.image, "path": f"{s.key}.{s.image_ext}"} for s in ordered],
        "conditioning_image": [{"bytes": s.conditioning_image, "path": f"{s.key}_conditioning.png"} for s in ordered],
        "text": [s.text for s in ordered],
        "source_caption": [s.source_caption for s in ordered],
        "generated_caption": [s.generated_caption for s in ordered],
        "url": [s.url for s in ordered],
        "similarity": [float(s.similarity) for s in ordered],
        "width": [int(s.width) for s in ordered],
        "height": [int(s.height) for s in ordered],
        "source": [s.source for s in ordered],
        "key": [s.key for s in ordered],
    }
    return pa.Table.from_pydict(columns, schema=dataset_features().arrow_schema)


def write_shard(out_dir: Path, shard: int | str, samples: Sequence[Sample]) -> Path | None:
    """Write one shard atomically; rewriting the same shard replaces it (so a resumed job never duplicates).
    A shard with no samples writes no file."""
    import hashlib
    import os

    previous = shard_files(out_dir, shard)
    path = None
    if samples:
        staged = atomic_write_table(Path(out_dir) / DATA_DIR / f".train-{_shard_name(shard)}.staged",
                                    samples_to_table(samples))
        digest = hashlib.sha256(staged.read_bytes()).hexdigest()[:DIGEST_CHARS]
        path = staged.with_name(f"train-{_shard_name(shard)}-{digest}.parquet")
        os.replace(staged, path)
    for old in previous:
        if old != path:
            old.unlink(missing_ok=True)
    return path


def write_preview(out_dir: Path, samples: Iterable[Sample], limit: int) -> list[Path]:
    """Save up to `limit` image/map pairs as files a person (or the UI gallery) can open."""
    from lib_controlnet.dataset.files import atomic_write_bytes

    folder = Path(out_dir) / PREVIEW_DIR
    written: list[Path] = []
    for sample in samples:
        if len(written) >= 2 * limit:
            break
        written.append(atomic_write_bytes(folder / f"{sample.key}_image.{sample.image_ext}", sample.image))
        written.append(atomic_write_bytes(folder / f"{sample.key}_conditioning.png", sample.conditioning_image))
    return written


def preview_pairs(out_dir: Path) -> list[tuple[Path, Path]]:
    folder = Path(out_dir) / PREVIEW_DIR
    pairs = []
    for cond in sorted(folder.glob("*_conditioning.png")):
        key = cond.name[: -len("_conditioning.png")]
        images = [p for p in folder.glob(f"{key}_image.*")]
        if images:
            pairs.append((images[0], cond))
    return pairs


def dataset_card(files: Sequence[str]) -> str:
    """The README.md: YAML front matter naming every data file (see the module docstring for why not a glob)."""
    import yaml

    front = {"configs": [{"config_name": "default", "data_files": [{"split": "train", "path": list(files)}]}]}
    return "---\n" + yaml.safe_dump(front, sort_keys=False) + "---\n" + CARD_BODY


def write_card(out_dir: Path) -> Path:
    out_dir = Path(out_dir)
    files = [p.relative_to(out_dir).as_posix() for p in data_files(out_dir)]
    return atomic_write_text(out_dir / "README.md", dataset_card(files))


def write_manifest(out_dir: Path, manifest: dict) -> Path:
    return atomic_write_json(Path(out_dir) / MANIFEST, manifest)


def write_failures(out_dir: Path, failures: Iterable[dict]) -> Path:
    rows = sorted(failures, key=lambda f: (str(f.get("key", "")), str(f.get("url", "")), str(f.get("stage", ""))))
    return atomic_write_jsonl(Path(out_dir) / FAILURES, rows)


def data_files(out_dir: Path) -> list[Path]:
    return sorted((Path(out_dir) / DATA_DIR).glob("train-*.parquet"))
