"""Embedding shards in clip-retrieval's inference layout: `img_emb/img_emb_NNNNN.npy`, `text_emb/text_emb_NNNNN.npy`
and `metadata/metadata_NNNNN.parquet`, row i of each shard describing the same image.

Shard names are zero-padded because embedding-reader (autofaiss) and clip-retrieval's back both order shards by
their names as text; padded names keep that order equal to the shard number. A shard is written atomically and
its metadata file last, so a build killed at any point resumes at the first shard without metadata.
"""
from __future__ import annotations

import io
from pathlib import Path
from typing import Callable, Iterable, Optional

import numpy as np

from lib_controlnet.dataset.files import atomic_write_bytes, atomic_write_table

DIGITS = 5


def shard_paths(root: Path, shard: int) -> dict:
    name = f"{shard:0{DIGITS}d}"
    return {"img": root / "img_emb" / f"img_emb_{name}.npy", "text": root / "text_emb" / f"text_emb_{name}.npy",
            "meta": root / "metadata" / f"metadata_{name}.parquet"}


def _save_npy(path: Path, array: np.ndarray) -> None:
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(array, dtype="float32"))
    atomic_write_bytes(path, buffer.getvalue())


def _open_image(load: Callable[[], bytes]):
    from PIL import Image

    try:
        image = Image.open(io.BytesIO(load()))
        image.load()
        return image
    except Exception:  # an unreadable image is left out of the index; the count of them is reported
        return None


def write_shards(items: list[dict], emb_root: Path, meta_root: Path, encoder, with_text: bool, shard_size: int,
                 batch_size: int = 32, on_progress: Optional[Callable[[int, int], None]] = None,
                 cancel=None) -> dict:
    """items: {"load": () -> image bytes, "meta": {column: value}}; metadata columns must be the same for all.
    Returns {"embedded", "skipped", "shards"}; shards already written are kept as they are."""
    import pyarrow as pa

    from lib_controlnet.dataset.download import Cancelled

    shards = (len(items) + shard_size - 1) // shard_size
    counts = {"embedded": 0, "skipped": 0, "shards": shards}
    for shard in range(shards):
        paths = shard_paths(emb_root, shard)
        paths["meta"] = meta_root / paths["meta"].name
        chunk = items[shard * shard_size:(shard + 1) * shard_size]
        if paths["meta"].exists():  # written last: the whole shard is there
            counts["embedded"] += _rows(paths["meta"])
            counts["skipped"] += len(chunk) - _rows(paths["meta"])
            continue
        if cancel is not None and cancel.is_set():
            raise Cancelled("Index build cancelled; run it again to resume.")
        vectors, metas = [], []
        for start in range(0, len(chunk), batch_size):
            batch = chunk[start:start + batch_size]
            opened = [(item, _open_image(item["load"])) for item in batch]
            kept = [(item, image) for item, image in opened if image is not None]
            counts["skipped"] += len(batch) - len(kept)
            if kept:
                vectors.append(encoder.encode_images([image for _, image in kept]))
                metas += [item["meta"] for item, _ in kept]
            if on_progress:
                on_progress(shard * shard_size + start + len(batch), len(items))
        image_vectors = np.concatenate(vectors) if vectors else np.zeros((0, encoder.dim), "float32")
        _save_npy(paths["img"], image_vectors)
        if with_text:
            _save_npy(paths["text"], encoder.encode_texts([m.get("caption") or "" for m in metas]))
        atomic_write_table(paths["meta"], pa.Table.from_pylist(metas) if metas else pa.table({}))
        counts["embedded"] += len(metas)
    return counts


def _rows(path: Path) -> int:
    import pyarrow.parquet as pq

    return pq.ParquetFile(path).metadata.num_rows


def folder_items(folder: Path) -> list[dict]:
    """Images of a folder (recursively, sorted), captions from `<stem>.txt` beside them."""
    from types import SimpleNamespace

    from lib_controlnet.dataset.sources.local_folder import read_local_folder

    rows = read_local_folder(SimpleNamespace(image_dir=str(folder)))
    return [{"load": (lambda p=row["url"]: Path(p).read_bytes()),
             "meta": {"image_path": row["url"], "caption": row["caption"]}} for row in rows]


def downloaded_items(work: Path) -> Iterable[dict]:
    """The images the img2dataset stage downloaded (its parquet shards), with their url and caption."""
    import pyarrow.parquet as pq

    from lib_controlnet.dataset.download import downloaded_shards

    items = []
    for _, path in downloaded_shards(work):
        table = pq.read_table(path)
        data_column = next((c for c in ("jpg", "png", "webp") if c in table.column_names), None)
        if data_column is None:
            continue
        for row in table.select(["url", "caption", "status", data_column]).to_pylist():
            if row["status"] != "success" or not row[data_column]:
                continue
            items.append({"load": (lambda data=row[data_column]: data),
                          "meta": {"url": row["url"], "caption": row["caption"] or ""}})
    return items
