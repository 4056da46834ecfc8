"""`dataset index build`: images (a folder, or a URL list through the img2dataset stage) or precomputed
embeddings -> an index folder in clip-retrieval's layout:

    INDEX/image.index  image.json   faiss index of the image embeddings (autofaiss) and autofaiss' report
    INDEX/text.index   text.json    the same for the captions, when the images have any
    INDEX/metadata/metadata_NNNNN.parquet   row i = vector i (image_path or url, caption, ...)
    INDEX/embeddings/{img_emb,text_emb}/    the vectors the indexes were built from (for rebuilds)
    INDEX/index_info.json                   the CLIP model that made the vectors; written last

Each step resumes: embedding shards are kept (embed.py), an index file is built under a temporary name and
renamed when whole, the download stage keeps its finished shards. Run the same command again after a kill.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Callable, Optional

from lib_controlnet.dataset.files import atomic_write_json
from lib_controlnet.errors import UserError

INFO_FILE = "index_info.json"
FORMAT = "controlnet-studio-clip-index/1"


class IndexBuildError(UserError):
    """The index cannot be built from what was given."""


@dataclasses.dataclass
class IndexBuildConfig:
    out_dir: str
    image_dir: Optional[str] = None
    url_list: Optional[str] = None
    url_col: str = "url"
    caption_col: str = "caption"
    embeddings_dir: Optional[str] = None
    clip_model: Optional[str] = None
    clip_weights: Optional[str] = None
    # None: autofaiss picks a key that fits max_index_memory and tunes its search parameters (clip-retrieval's
    # way); a key: faiss builds exactly that index (_faiss_direct)
    index_key: Optional[str] = None
    index_param: Optional[str] = None
    max_index_memory: str = "4G"
    current_memory: str = "16G"
    nb_cores: Optional[int] = None
    shard_size: int = 10000
    batch_size: int = 32
    allow_private_urls: bool = False
    download_size: int = 256  # pixels the URL-list images are downloaded at; CLIP looks at 224-336

    def source_count(self) -> int:
        return sum(bool(v) for v in (self.image_dir, self.url_list, self.embeddings_dir))


def _autofaiss(emb_folder: Path, index_path: Path, infos_path: Path, config: IndexBuildConfig) -> None:
    from autofaiss import build_index

    partial = index_path.with_name("." + index_path.name + ".partial")
    partial.unlink(missing_ok=True)
    index, _ = build_index(
        embeddings=str(emb_folder), index_path=str(partial), index_infos_path=str(infos_path),
        index_key=config.index_key, index_param=config.index_param,
        max_index_memory_usage=config.max_index_memory, current_memory_available=config.current_memory,
        nb_cores=config.nb_cores or os.cpu_count(), metric_type="ip", verbose=logging.WARNING,
    )
    if index is None or not partial.exists():  # autofaiss logs its reason and returns None
        raise IndexBuildError(
            f"autofaiss could not build {index_path.name} within max_index_memory {config.max_index_memory} and "
            f"current_memory {config.current_memory}; raise --current-memory or lower --max-index-memory.")
    os.replace(partial, index_path)


def _memory_bytes(text: str, flag: str) -> float:
    """'4G', '512M', '1.5GB' -> bytes (autofaiss' notation, which the default path hands it as it is)."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([BKMGTP])B?\s*", text, re.IGNORECASE)
    if not match:
        raise IndexBuildError(f"{flag} {text!r} is not a memory size such as 4G or 512M.")
    return float(match.group(1)) * 1024 ** "BKMGTP".index(match.group(2).upper())


def _training_sample(paths: list, sizes: list, count: int):
    """`count` vectors drawn at random (seeded) from all shards, in shard order, as one float32 array: a sample
    of the whole collection, where autofaiss takes the first `count` (biased when the shards are sorted). The
    memory maps close on return, so the pages they read leave the process' resident memory."""
    import numpy as np

    picks = np.sort(np.random.default_rng(0).choice(sum(sizes), count, replace=False))
    sample, at, start = None, 0, 0
    for path, size in zip(paths, sizes):
        array = np.load(path, mmap_mode="r")
        if sample is None:
            sample = np.empty((count, array.shape[1]), dtype="float32")
        rows = picks[(picks >= start) & (picks < start + size)] - start
        sample[at:at + len(rows)] = array[rows]
        at, start = at + len(rows), start + size
        del array
    return sample


def _float32_chunks(path: Path, rows: int):
    """A shard's vectors, `rows` at a time, read into one reused float32 buffer (valid until the next chunk):
    pages read through a memory map would stay in the process' resident memory to the end of the build, which
    for a 1M x 768 collection is 3 GiB on top of the index."""
    import numpy as np

    fmt = np.lib.format
    with open(path, "rb") as handle:
        version = fmt.read_magic(handle)
        read_header = fmt.read_array_header_1_0 if version == (1, 0) else fmt.read_array_header_2_0
        shape, fortran_order, dtype = read_header(handle)
        if fortran_order:  # not what numpy or clip-retrieval write; read through a map, chunk by chunk
            array = np.load(path, mmap_mode="r")
            for start in range(0, len(array), rows):
                yield np.ascontiguousarray(array[start:start + rows], dtype="float32")
            return
        raw = np.empty((min(rows, shape[0]), shape[1]), dtype=dtype)
        out = raw if raw.dtype == np.dtype("float32") else np.empty(raw.shape, dtype="float32")  # e.g. float16
        for start in range(0, shape[0], rows):
            count = min(rows, shape[0] - start)
            if handle.readinto(memoryview(raw[:count]).cast("B")) != raw[:count].nbytes:
                raise IndexBuildError(f"{path} is shorter than its header says; the shard is truncated.")
            if out is not raw:
                out[:count] = raw[:count]
            yield out[:count]


def _faiss_direct(emb_folder: Path, index_path: Path, infos_path: Path, config: IndexBuildConfig) -> None:
    """The index key the user chose, built with faiss itself: autofaiss takes only IVF-Flat and PQ keys for
    inner-product search (it refuses e.g. IVF-SQ8). Vectors stream from the shards in chunks, so the
    build holds the index, a training sample and one chunk; the finished index must fit max_index_memory.
    The IVF indexes faiss makes from such keys get their coarse k-means and list assignment from ivf.py (the same
    algorithm, numpy's faster matrix product); anything else is trained and filled by faiss alone."""
    import faiss
    import numpy as np

    from lib_controlnet.dataset.index import ivf

    paths = sorted(emb_folder.glob("*.npy"))  # text order, as autofaiss'
    shapes = [np.load(p, mmap_mode="r").shape for p in paths]  # headers only
    sizes, dim = [int(shape[0]) for shape in shapes], int(shapes[0][1])
    total = sum(sizes)
    try:
        index = faiss.index_factory(dim, config.index_key, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError:
        raise IndexBuildError(f"faiss does not understand the index key '{config.index_key}'.") from None
    try:
        nlist = faiss.extract_index_ivf(index).nlist
    except RuntimeError:  # not an IVF index
        nlist = 0
    need = total * index.sa_code_size() + nlist * dim * 4
    if need > _memory_bytes(config.max_index_memory, "--max-index-memory"):
        raise IndexBuildError(f"Index {config.index_key} over {total} vectors needs about {need / 2**30:.2f} GiB, "
                              f"more than --max-index-memory {config.max_index_memory}; choose a smaller code.")
    if nlist > total:
        raise IndexBuildError(f"Index {config.index_key} has {nlist} lists but there are only {total} vectors; "
                              f"choose fewer lists (IVF{max(1, total // 100)} or less).")
    if config.nb_cores:
        faiss.omp_set_num_threads(config.nb_cores)
    fast = ivf.plain_ivf(index)
    with ivf.blas_threads(config.nb_cores):
        if not index.is_trained:
            # 100 points per centroid, autofaiss' choice (faiss wants 39 to 256); more only slows training
            sample = _training_sample(paths, sizes, min(total, max(100 * nlist, 10_000) if nlist else 100_000))
            if fast is not None:
                ivf.train_quantizer(fast, sample)
            index.train(sample)  # with the quantizer filled, faiss trains only what follows it
            del sample
        centroids = fast.quantizer.reconstruct_n(0, nlist) if fast is not None else None
        for path in paths:
            for chunk in _float32_chunks(path, 65536):
                if fast is not None:
                    ivf.add_assigned(fast, chunk, centroids)
                else:
                    index.add(chunk)
    if config.index_param:
        faiss.ParameterSpace().set_index_parameters(index, config.index_param)
    partial = index_path.with_name("." + index_path.name + ".partial")
    faiss.write_index(index, str(partial))
    atomic_write_json(infos_path, {"index_key": config.index_key, "index_param": config.index_param,
                                   "nb_vectors": total, "size_in_bytes": partial.stat().st_size, "built_with": "faiss"})
    os.replace(partial, index_path)
    infos = json.loads(infos_path.read_text("utf-8")) if infos_path.is_file() else {}
    atomic_write_json(infos_path, {**infos, "index_path": str(index_path)})  # autofaiss wrote the partial name


def _count_vectors(folder: Path) -> int:
    import numpy as np

    return sum(int(np.load(p, mmap_mode="r").shape[0]) for p in sorted(folder.glob("*.npy")))


def _check_precomputed(root: Path) -> tuple[Path, Optional[Path], Path]:
    """-> (img_emb, text_emb or None, metadata); each npy shard must pair with a parquet of as many rows."""
    import numpy as np
    import pyarrow.parquet as pq

    img, text, meta = root / "img_emb", root / "text_emb", root / "metadata"
    npys, parquets = sorted(img.glob("*.npy")), sorted(meta.glob("*.parquet"))
    if not npys or not parquets:
        raise IndexBuildError(f"{root} needs img_emb/*.npy beside metadata/*.parquet (clip-retrieval's layout).")
    if len(npys) != len(parquets):
        raise IndexBuildError(f"{root} holds {len(npys)} img_emb shards but {len(parquets)} metadata shards.")
    for npy, parquet in zip(npys, parquets):
        try:
            rows = pq.ParquetFile(parquet).metadata.num_rows
        except Exception:  # pyarrow's own types; one sentence is what the user needs
            raise IndexBuildError(f"Metadata file {parquet} is not a readable parquet file.") from None
        vectors = np.load(npy, mmap_mode="r").shape[0]
        if rows != vectors:
            raise IndexBuildError(f"{npy.name} holds {vectors} vectors but {parquet.name} {rows} rows.")
    has_text = text.is_dir() and len(sorted(text.glob("*.npy"))) == len(npys)
    return img, text if has_text else None, meta


def _clip_dim(config: IndexBuildConfig) -> Optional[int]:
    if not config.clip_model and not config.clip_weights:
        return None
    from lib_controlnet.dataset.index.clip_model import load_encoder

    return load_encoder(config.clip_model, config.clip_weights).dim


def _download(config: IndexBuildConfig, work: Path, say, cancel):
    from lib_controlnet.dataset.config import BuildConfig
    from lib_controlnet.dataset.download import run_download
    from lib_controlnet.dataset.sources import collect

    dataset_config = BuildConfig(out_dir=str(work), url_list=config.url_list, url_col=config.url_col,
                                 caption_col=config.caption_col, image_size=config.download_size,
                                 resize_mode="keep_ratio", allow_private_urls=config.allow_private_urls,
                                 samples_per_shard=max(2, config.shard_size)).validated()
    candidates = collect(dataset_config)
    if not candidates:
        raise IndexBuildError(f"URL list {config.url_list} holds no usable URLs.")
    say(f"downloading {len(candidates)} images")
    run_download(dataset_config, candidates, work, lambda done, total: None, cancel=cancel)
    return len(candidates)


def build_local_index(config: IndexBuildConfig, say: Callable[[str], None] = print, cancel=None) -> dict:
    """Build (or resume) the index; returns what index_info.json holds."""
    from lib_controlnet.dataset.index import embed

    if config.source_count() != 1:
        raise IndexBuildError("Give exactly one source: --image-dir, --url-list or --embeddings.")
    out = Path(config.out_dir).expanduser().resolve()
    out.mkdir(parents=True, exist_ok=True)
    if config.embeddings_dir:
        img_emb, text_emb, meta_src = _check_precomputed(Path(config.embeddings_dir).expanduser().resolve())
        vectors = _count_vectors(img_emb)
        import numpy as np

        dim = int(np.load(sorted(img_emb.glob("*.npy"))[0], mmap_mode="r").shape[1])
        clip_dim = _clip_dim(config)
        if clip_dim is not None and clip_dim != dim:
            raise IndexBuildError(f"CLIP model {config.clip_model} makes {clip_dim}-d vectors but the embeddings are {dim}-d.")
        if not (out / "metadata").is_dir():  # copied whole under a temporary name, like clip-retrieval's index
            tmp = out / ".metadata.partial"
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.copytree(meta_src, tmp)
            os.replace(tmp, out / "metadata")
        embedded, skipped = vectors, 0
    else:
        from lib_controlnet.dataset.index.clip_model import load_encoder

        encoder = load_encoder(config.clip_model, config.clip_weights)
        not_downloaded = 0
        if config.image_dir:
            items = embed.folder_items(Path(config.image_dir).expanduser())
        else:
            work = out / "download_work"  # img2dataset's shards and log: a rerun resumes from them
            asked = _download(config, work, say, cancel)
            items = embed.downloaded_items(work)
            not_downloaded = asked - len(items)  # why each failed: download_work/download/img2dataset.log
        with_text = any(item["meta"].get("caption") for item in items)
        say(f"embedding {len(items)} images with {config.clip_model}")
        counts = embed.write_shards(items, out / "embeddings", out / "metadata", encoder, with_text,
                                    config.shard_size, config.batch_size, cancel=cancel)
        img_emb = out / "embeddings" / "img_emb"
        text_emb = out / "embeddings" / "text_emb" if with_text else None
        embedded, skipped, dim = counts["embedded"], counts["skipped"] + not_downloaded, encoder.dim
        if embedded == 0:
            raise IndexBuildError("None of the images could be read; nothing to index.")
    for name, folder in (("image", img_emb), ("text", text_emb)):
        if folder is None or (out / f"{name}.index").exists():
            continue
        say(f"building {name}.index from {embedded} vectors")
        build = _faiss_direct if config.index_key else _autofaiss
        build(folder, out / f"{name}.index", out / f"{name}.json", config)
    model = config.clip_model
    if model and model.endswith(".json"):  # a config file: found again from wherever the index is queried
        model = str(Path(model).expanduser().resolve())
    info = {"format": FORMAT, "clip_model": model,
            "clip_weights": str(Path(config.clip_weights).expanduser().resolve()) if config.clip_weights else None,
            "dim": dim, "count": embedded, "skipped_images": skipped, "index_key": config.index_key,
            "index_param": config.index_param, "text_index": text_emb is not None,
            # precomputed vectors stay where they are; search re-ranks with them while they are there
            "embeddings_dir": str(Path(config.embeddings_dir).expanduser().resolve()) if config.embeddings_dir else None}
    atomic_write_json(out / INFO_FILE, info)
    say(f"index ready: {out} ({embedded} vectors of {dim} dims, {skipped} images left out)")
    return info
