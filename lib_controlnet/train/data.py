"""Training data: open a dataset folder, turn rows into (target, hint, caption) tensors, and plan batch order.

Three layouts are read: the Dataset tab's output (parquet shards under data/ with two `Image()` columns),
any Hugging Face dataset saved with `save_to_disk`, and a folder pair images/ + conditioning/ with optional
`<stem>.txt` captions. The batch order and every random choice (crop, flip, prompt dropout) derive from
(seed, epoch, position) alone, so a resumed run sees exactly the samples the uninterrupted one would.
"""
from __future__ import annotations

import dataclasses
import io
import random
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from lib_controlnet.errors import UserError
from lib_controlnet.train.config import TrainConfig

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
BUCKET_STEP = 64  # SD UNets downsample latents 8x more, so image sides must be multiples of 64


class DatasetError(UserError):
    """The training dataset cannot be read or does not have what training needs."""


# ---------------------------------------------------------------------------------------------- records
class HFRecords:
    """Rows of a Hugging Face `datasets.Dataset` (parquet shards or `save_to_disk`)."""

    def __init__(self, dataset, config: TrainConfig, name: str):
        columns = [config.image_column, config.conditioning_image_column, config.caption_column]
        missing = [c for c in columns if c not in dataset.column_names]
        if missing:
            raise DatasetError(f"Dataset {name} has no column(s) {', '.join(missing)}; it has "
                               f"{', '.join(dataset.column_names)} (set image_column / conditioning_image_column / "
                               "caption_column).")
        self.columns = columns
        self.dataset = dataset.select_columns(columns)
        self.size_columns = ("width", "height") if {"width", "height"} <= set(dataset.column_names) else None
        self._sizes_source = dataset
        self.name = name

    def __len__(self) -> int:
        return len(self.dataset)

    def load(self, index: int):
        row = self.dataset[int(index)]
        return _as_image(row[self.columns[0]]), _as_image(row[self.columns[1]]), str(row[self.columns[2]] or "")

    def sizes(self) -> list[tuple[int, int]]:
        if self.size_columns:
            table = self._sizes_source.select_columns(list(self.size_columns))
            return list(zip(table["width"], table["height"]))
        import datasets

        raw = self.dataset.cast_column(self.columns[0], datasets.Image(decode=False))
        return [_header_size(raw[i][self.columns[0]]) for i in range(len(raw))]


class FolderRecords:
    """images/NAME.ext + conditioning/NAME.ext (+ NAME.txt in images/ or captions/)."""

    def __init__(self, root: Path):
        images = {p.stem: p for p in sorted((root / "images").iterdir()) if p.suffix.lower() in IMAGE_SUFFIXES}
        conds = {p.stem: p for p in sorted((root / "conditioning").iterdir()) if p.suffix.lower() in IMAGE_SUFFIXES}
        self.keys = sorted(set(images) & set(conds))
        self.images, self.conds, self.root = images, conds, root
        self.name = root.name

    def __len__(self) -> int:
        return len(self.keys)

    def load(self, index: int):
        key = self.keys[int(index)]
        caption = ""
        for folder in (self.root / "captions", self.root / "images"):
            path = folder / f"{key}.txt"
            if path.is_file():
                caption = path.read_text(encoding="utf-8").strip()
                break
        return _open_rgb(self.images[key]), _open_rgb(self.conds[key]), caption

    def sizes(self) -> list[tuple[int, int]]:
        sizes = []
        for key in self.keys:
            with Image.open(self.images[key]) as image:
                sizes.append(image.size)
        return sizes


def detect_format(root: Path) -> str:
    if (root / "images").is_dir() and (root / "conditioning").is_dir():
        return "folder"
    if any((root / name).is_file() for name in ("dataset_info.json", "dataset_dict.json", "state.json")):
        return "hf_disk"
    if any(root.rglob("*.parquet")):
        return "parquet"
    raise DatasetError(f"{root} is not a training dataset: expected parquet shards (the Dataset tab's output), a "
                       "Hugging Face dataset saved with save_to_disk, or images/ and conditioning/ folders.")


def open_records(config: TrainConfig, cache_dir: Path | None = None):
    root = Path(config.dataset).expanduser()
    if not config.dataset or not root.is_dir():
        raise DatasetError(f"Training dataset folder {config.dataset!r} does not exist.")
    kind = detect_format(root) if config.dataset_format == "auto" else config.dataset_format
    if kind == "folder":
        records = FolderRecords(root)
    else:
        import datasets

        try:
            if kind == "hf_disk":
                loaded = datasets.load_from_disk(str(root))
                if isinstance(loaded, datasets.DatasetDict):
                    loaded = loaded["train"] if "train" in loaded else next(iter(loaded.values()))
            else:
                files = sorted(str(p) for p in root.rglob("*.parquet") if ".build" not in p.parts)
                loaded = datasets.load_dataset("parquet", data_files={"train": files}, split="train",
                                               cache_dir=str(cache_dir) if cache_dir else None)
        except UserError:
            raise
        except Exception as error:
            raise DatasetError(f"Dataset {root} could not be read: {error}") from None
        records = HFRecords(loaded, config, root.name)
    if config.max_train_samples is not None and len(records) > config.max_train_samples:
        records = _Limited(records, config.max_train_samples)
    if len(records) == 0:
        raise DatasetError(f"Dataset {root} holds no complete (image, conditioning image) pairs.")
    return records


class _Limited:
    def __init__(self, records, limit: int):
        self.records, self.limit, self.name = records, limit, records.name

    def __len__(self):
        return self.limit

    def load(self, index):
        return self.records.load(index)

    def sizes(self):
        return self.records.sizes()[: self.limit]


def _as_image(value) -> Image.Image:
    if isinstance(value, Image.Image):
        return value.convert("RGB")
    if isinstance(value, dict) and value.get("bytes"):
        return Image.open(io.BytesIO(value["bytes"])).convert("RGB")
    if isinstance(value, dict) and value.get("path"):
        return _open_rgb(Path(value["path"]))
    if isinstance(value, (str, Path)):
        return _open_rgb(Path(value))
    raise DatasetError(f"A dataset cell holds {type(value).__name__}, not an image.")


def _header_size(value) -> tuple[int, int]:
    source = io.BytesIO(value["bytes"]) if value.get("bytes") else value["path"]
    with Image.open(source) as image:
        return image.size


def _open_rgb(path: Path) -> Image.Image:
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except Exception as error:
        raise DatasetError(f"Image {path} could not be read: {error}") from None


# ---------------------------------------------------------------------------------------------- transforms
def bucket_sizes(resolution: int) -> list[tuple[int, int]]:
    """(width, height) pairs, multiples of 64, area at most resolution**2, aspect ratio within 1:4..4:1."""
    area = resolution * resolution
    sizes = set()
    width = BUCKET_STEP
    while width <= resolution * 4:
        height = (area // width) // BUCKET_STEP * BUCKET_STEP
        if height >= BUCKET_STEP and 0.25 <= width / height <= 4:
            sizes.add((width, height))
        width += BUCKET_STEP
    sizes.add((resolution, resolution))
    return sorted(sizes)


def nearest_bucket(size: tuple[int, int], buckets: list[tuple[int, int]]) -> tuple[int, int]:
    aspect = np.log(size[0] / size[1])
    return min(buckets, key=lambda b: (abs(np.log(b[0] / b[1]) - aspect), -b[0] * b[1]))


def sample_rng(seed: int, epoch: int, index: int) -> random.Random:
    return random.Random(f"{seed}:{epoch}:{index}")  # str seeds hash with sha512: stable across runs


def crop_pair(image: Image.Image, hint: Image.Image, size: tuple[int, int], crop: str, flip: bool,
              rng: random.Random) -> tuple[Image.Image, Image.Image]:
    """Resize so that `size` is covered, then cut the SAME box out of both images (and flip both alike)."""
    return crop_pair_with_time_ids(image, hint, size, crop, flip, rng)[:2]


def crop_pair_with_time_ids(image, hint, size, crop, flip, rng):
    """`crop_pair` plus SDXL's micro-conditioning of the sample: (original height, width, crop top, crop left,
    target height, width), the crop measured in the resized image and mirrored with a flip, as diffusers'
    train_controlnet_sdxl.py computes it."""
    original = (image.height, image.width)
    width, height = size
    if hint.size != image.size:
        hint = hint.resize(image.size, Image.BILINEAR)
    scale = max(width / image.width, height / image.height)
    scaled = (max(width, round(image.width * scale)), max(height, round(image.height * scale)))
    image, hint = image.resize(scaled, Image.BICUBIC), hint.resize(scaled, Image.BILINEAR)
    spare_x, spare_y = scaled[0] - width, scaled[1] - height
    if crop == "random":
        left, top = rng.randint(0, spare_x), rng.randint(0, spare_y)
    else:
        left, top = spare_x // 2, spare_y // 2
    box = (left, top, left + width, top + height)
    image, hint = image.crop(box), hint.crop(box)
    if flip and rng.random() < 0.5:
        image, hint = image.transpose(Image.FLIP_LEFT_RIGHT), hint.transpose(Image.FLIP_LEFT_RIGHT)
        left = spare_x - left
    return image, hint, torch.tensor([*original, top, left, height, width], dtype=torch.float32)


def to_target(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1).contiguous()


def to_hint(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1).contiguous()


def load_hint_file(path, size: tuple[int, int]) -> torch.Tensor:
    """A validation conditioning image, resized and centre-cropped as training data is."""
    image = _open_rgb(Path(path))
    _, hint = crop_pair(image, image, size, "center", False, random.Random(0))
    return to_hint(hint)


class TrainDataset(torch.utils.data.Dataset):
    """Items are addressed by (index, epoch, width, height): what to load, how to randomise it, at what size."""

    def __init__(self, records, config: TrainConfig):
        self.records, self.config = records, config

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, item):
        index, epoch, width, height = item
        image, hint, text = self.records.load(index)
        rng = sample_rng(self.config.seed, epoch, index)
        image, hint, time_ids = crop_pair_with_time_ids(image, hint, (width, height), self.config.crop,
                                                        self.config.random_flip, rng)
        if rng.random() < self.config.proportion_empty_prompts:
            text = ""
        return {"pixel_values": to_target(image), "conditioning_pixel_values": to_hint(hint), "text": text,
                "index": index, "time_ids": time_ids}


def collate(items: list[dict]) -> dict:
    return {
        "pixel_values": torch.stack([i["pixel_values"] for i in items]),
        "conditioning_pixel_values": torch.stack([i["conditioning_pixel_values"] for i in items]),
        "text": [i["text"] for i in items],
        "index": torch.tensor([i["index"] for i in items]),
        "time_ids": torch.stack([i["time_ids"] for i in items]),
    }


# ---------------------------------------------------------------------------------------------- order
@dataclasses.dataclass
class BatchPlan:
    """Which samples make up every (global) batch of an epoch; process p takes its slice of each."""

    config: TrainConfig
    num_samples: int
    num_processes: int = 1
    sample_sizes: list | None = None  # per-sample bucket (w, h) when aspect buckets are on

    @classmethod
    def build(cls, records, config: TrainConfig, num_processes: int = 1) -> "BatchPlan":
        sizes = None
        if config.aspect_buckets:
            buckets = bucket_sizes(config.resolution)
            sizes = [nearest_bucket(s, buckets) for s in records.sizes()]
        plan = cls(config, len(records), num_processes, sizes)
        if plan.batches_per_epoch() == 0:
            raise DatasetError(f"The dataset has {len(records)} usable samples, fewer than one batch of "
                               f"{plan.global_batch} (batch size x processes); lower train_batch_size.")
        return plan

    @property
    def global_batch(self) -> int:
        return self.config.train_batch_size * self.num_processes

    def epoch_batches(self, epoch: int) -> list[list[tuple[int, int, int, int]]]:
        generator = torch.Generator().manual_seed(self.config.seed * 1_000_003 + epoch)
        order = torch.randperm(self.num_samples, generator=generator).tolist()
        square = (self.config.resolution, self.config.resolution)
        batches, pending = [], {}
        for index in order:
            size = self.sample_sizes[index] if self.sample_sizes else square
            group = pending.setdefault(size, [])
            group.append((index, epoch, size[0], size[1]))
            if len(group) == self.global_batch:
                batches.append(pending.pop(size))
        return batches  # incomplete groups are dropped, as drop_last does

    def batches_per_epoch(self) -> int:
        return len(self.epoch_batches(0))

    def local_batches(self, epoch: int, process_index: int, skip: int = 0, limit: int | None = None):
        size = self.config.train_batch_size
        for batch in self.epoch_batches(epoch)[skip:limit]:
            yield batch[process_index * size:(process_index + 1) * size]


def make_loader(dataset: TrainDataset, batches, num_workers: int):
    """A DataLoader over pre-planned batches. It gets its own generator so that creating it does not draw
    from the global torch RNG (which would shift noise and break exact resume)."""
    return torch.utils.data.DataLoader(dataset, batch_sampler=list(batches), collate_fn=collate,
                                       num_workers=num_workers, generator=torch.Generator())
