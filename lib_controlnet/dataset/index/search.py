"""LocalIndex: search an index folder (ours, or any clip-retrieval index with an index_info.json) on this
machine. The faiss files are memory-mapped (IVF indexes; others are read whole), metadata parquet files are
opened per file on demand, so an index larger than RAM is searched from the page cache.

Filters follow clip-retrieval's back where the data allows: dedup joins results whose embeddings have a cosine
above 0.94 (the back's threshold) and keeps the best of each group; the safety filter drops rows whose metadata
says unsafe (`punsafe` > 0.5, or `NSFW` == "NSFW", LAION's columns); `aesthetic_score` keeps rows whose
`aesthetic` column reaches it. Without those columns the filter has nothing to look at and keeps every row.
"""
from __future__ import annotations

import json
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Optional

import numpy as np

from lib_controlnet.errors import UserError

DEDUP_THRESHOLD = 0.94
RERANK_FACTOR = 4  # candidates fetched from the compressed index per result wanted, when exact vectors exist
INDEX_FILES = {"image": "image.index", "text": "text.index"}


class LocalIndexError(UserError):
    """The folder is not an index, or a query does not fit it."""


def _read_index(path: Path):
    import faiss

    try:
        return faiss.read_index(str(path), faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY)
    except RuntimeError:
        pass  # faiss memory-maps IVF indexes only; the others are read whole
    try:
        return faiss.read_index(str(path))
    except RuntimeError:
        raise LocalIndexError(f"{path} is not a readable faiss index file.") from None


class LocalIndex:
    def __init__(self, folder: str | Path):
        import pyarrow.parquet as pq

        self.folder = Path(folder).expanduser().resolve()
        present = {m: self.folder / f for m, f in INDEX_FILES.items() if (self.folder / f).is_file()}
        self.metadata_files = sorted((self.folder / "metadata").glob("*.parquet"))  # text order, as the back's
        if not self.folder.is_dir():
            raise LocalIndexError(f"{folder} is neither a knn backend URL (http:// or https://) nor an index folder.")
        if not present or not self.metadata_files:
            raise LocalIndexError(f"{self.folder} is not a CLIP index folder (it needs image.index or text.index "
                                  "and metadata/*.parquet); build one with `python -m lib_controlnet dataset index build`.")
        info_path = self.folder / "index_info.json"
        self.info = json.loads(info_path.read_text("utf-8")) if info_path.is_file() else {}
        self.indexes = {m: _read_index(p) for m, p in present.items()}
        counts = []
        for path in self.metadata_files:
            try:
                counts.append(pq.ParquetFile(path).metadata.num_rows)
            except Exception:  # pyarrow's own types; one sentence is what the user needs
                raise LocalIndexError(f"Metadata file {path} is not a readable parquet file.") from None
        self.offsets = np.cumsum([0] + counts)
        for modality, index in self.indexes.items():
            if index.ntotal != self.offsets[-1]:
                raise LocalIndexError(f"{INDEX_FILES[modality]} holds {index.ntotal} vectors but metadata/ "
                                      f"{self.offsets[-1]} rows; rebuild the index.")
            if self.info.get("index_param"):
                import faiss

                faiss.ParameterSpace().set_index_parameters(index, self.info["index_param"])
        self.dim = next(iter(self.indexes.values())).d
        self.vectors = {m: self._exact_vectors(m, index.ntotal) for m, index in self.indexes.items()}
        self._tables: OrderedDict = OrderedDict()
        self._lock = threading.Lock()
        self._encoder = None

    def _exact_vectors(self, modality: str, total: int):
        """The vectors the index was built from, memory-mapped, when they are still where the build left them:
        results are then re-ranked by exact similarity, which the compressed codes only approximate."""
        sub = "img_emb" if modality == "image" else "text_emb"
        roots = [self.folder / "embeddings"] + ([Path(self.info["embeddings_dir"])] if self.info.get("embeddings_dir") else [])
        for root in roots:
            files = sorted((root / sub).glob("*.npy"))  # text order: the order the index was built in
            if not files:
                continue
            arrays = [np.load(f, mmap_mode="r") for f in files]
            if sum(len(a) for a in arrays) == total and arrays[0].shape[1] == self.dim:
                return arrays, np.cumsum([0] + [len(a) for a in arrays])
        return None

    def exact(self, modality: str, ids: np.ndarray) -> Optional[np.ndarray]:
        stored = self.vectors.get(modality)
        if stored is None:
            return None
        arrays, offsets = stored
        out = np.empty((len(ids), self.dim), "float32")
        files = np.searchsorted(offsets, ids, side="right") - 1
        for f in np.unique(files):
            picks = np.nonzero(files == f)[0]
            out[picks] = arrays[f][ids[picks] - offsets[f]]
        return out

    @property
    def name(self) -> str:
        return self.folder.name

    # -- queries -> vectors --
    def encoder(self):
        if self._encoder is None:
            from lib_controlnet.dataset.index.clip_model import load_encoder

            if not self.info.get("clip_model"):
                raise LocalIndexError(f"Index {self.folder} names no CLIP model (index_info.json), so it takes "
                                      "embedding queries only.")
            encoder = load_encoder(self.info["clip_model"], self.info.get("clip_weights"))
            if encoder.dim != self.dim:
                raise LocalIndexError(f"CLIP model {self.info['clip_model']} makes {encoder.dim}-d vectors but "
                                      f"index {self.folder.name} holds {self.dim}-d ones.")
            self._encoder = encoder
        return self._encoder

    def text_vector(self, text: str) -> np.ndarray:
        return self.encoder().encode_texts([text])

    def image_vector(self, data: bytes) -> np.ndarray:
        import io

        from PIL import Image

        try:
            image = Image.open(io.BytesIO(data))
            image.load()
        except Exception:  # Pillow raises several types for bad bytes
            raise LocalIndexError("The query image cannot be read as an image.") from None
        return self.encoder().encode_images([image])

    def embedding_vector(self, values) -> np.ndarray:
        vector = np.asarray(values, dtype="float32").reshape(1, -1)
        if vector.shape[1] != self.dim:
            raise LocalIndexError(f"The query embedding has {vector.shape[1]} values but index {self.name} "
                                  f"holds {self.dim}-d vectors.")
        return vector

    # -- search --
    def search(self, vector: np.ndarray, modality: str = "image", num_images: int = 40,
               num_result_ids: Optional[int] = None, deduplicate: bool = True, use_safety_model: bool = False,
               aesthetic_score: Optional[float] = None, columns: Optional[list] = None) -> list[dict]:
        if modality not in self.indexes:
            raise LocalIndexError(f"Index {self.name} has no {INDEX_FILES.get(modality, modality)} "
                                  f"(it has: {', '.join(INDEX_FILES[m] for m in self.indexes)}).")
        vector = np.ascontiguousarray(vector, dtype="float32").reshape(1, -1)
        if vector.shape[1] != self.dim:
            raise LocalIndexError(f"The query has {vector.shape[1]} dims but index {self.name} holds {self.dim}-d vectors.")
        index = self.indexes[modality]
        k = int(max(num_images, num_result_ids or num_images))
        embeddings = None
        if self.vectors.get(modality) is not None:
            distances, ids = index.search(vector, k * RERANK_FACTOR)
            ids = ids[0][ids[0] >= 0]
            embeddings = self.exact(modality, ids)
            scores = embeddings @ vector[0]
            order = np.argsort(-scores, kind="stable")[:k]
            ids, distances, embeddings = ids[order], scores[order], embeddings[order]
        elif deduplicate:
            try:
                distances, ids, embeddings = index.search_and_reconstruct(vector, k)
                keep = ids[0] >= 0
                ids, distances, embeddings = ids[0][keep], distances[0][keep], embeddings[0][keep]
            except RuntimeError:  # an index type that cannot reconstruct: no dedup
                distances, ids = index.search(vector, k)
        else:
            distances, ids = index.search(vector, k)
        if ids.ndim == 2:
            keep = ids[0] >= 0
            ids, distances = ids[0][keep], distances[0][keep]
        if deduplicate and embeddings is not None and len(ids) > 1:
            order = _unique(embeddings)
            ids, distances = ids[order], distances[order]
        metas = self.metadata(ids, columns)
        results = []
        for rid, distance, meta in zip(ids, distances, metas):
            if use_safety_model and _unsafe(meta):
                continue
            if aesthetic_score is not None and "aesthetic" in meta and (meta["aesthetic"] or 0) < aesthetic_score:
                continue
            results.append({**meta, "id": int(rid), "similarity": float(distance)})
            if len(results) >= num_images:
                break
        return results

    def metadata(self, ids, columns: Optional[list] = None) -> list[dict]:
        """Rows of metadata/ for global ids, in the order given."""
        ids = np.asarray(ids, dtype="int64")
        files = np.searchsorted(self.offsets, ids, side="right") - 1
        rows: list = [None] * len(ids)
        for file_index in np.unique(files):
            table = self._table(int(file_index))
            picks = np.nonzero(files == file_index)[0]
            local = ids[picks] - self.offsets[file_index]
            names = [c for c in (columns or table.column_names) if c in table.column_names]
            taken = table.select(names).take(local).to_pylist()
            for position, row in zip(picks, taken):
                rows[position] = {k: (v.decode("utf-8", "replace") if isinstance(v, bytes) else v)
                                  for k, v in row.items()}
        return rows

    def _table(self, file_index: int):
        import pyarrow.parquet as pq

        with self._lock:
            if file_index in self._tables:
                self._tables.move_to_end(file_index)
                return self._tables[file_index]
            path = self.metadata_files[file_index]
            try:
                table = pq.read_table(path, memory_map=True)
            except Exception:  # pyarrow's own types
                raise LocalIndexError(f"Metadata file {path} is not a readable parquet file.") from None
            self._tables[file_index] = table
            while len(self._tables) > 16:  # a few files at a time, whatever the index size
                self._tables.popitem(last=False)
            return table


def _unique(embeddings: np.ndarray) -> list[int]:
    """Positions to keep: the first (best) of every group of results linked by cosine > DEDUP_THRESHOLD."""
    norms = np.linalg.norm(embeddings, axis=1, keepdims=True)
    unit = embeddings / np.maximum(norms, 1e-12)
    close = unit @ unit.T > DEDUP_THRESHOLD
    parent = list(range(len(unit)))

    def root(i):
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i, j in zip(*np.nonzero(np.triu(close, 1))):
        a, b = root(int(i)), root(int(j))
        if a != b:
            parent[max(a, b)] = min(a, b)
    return [i for i in range(len(unit)) if root(i) == i]


def _unsafe(meta: dict) -> bool:
    punsafe = meta.get("punsafe")
    if isinstance(punsafe, (int, float)) and punsafe > 0.5:
        return True
    return str(meta.get("NSFW") or "").upper() == "NSFW"


_OPEN: dict = {}
_OPEN_LOCK = threading.Lock()


def open_index(folder: str | Path) -> LocalIndex:
    """One LocalIndex per folder per process (the Dataset tab queries the same index build after build)."""
    path = Path(folder).expanduser().resolve()
    stamps = tuple((path / f).stat().st_mtime_ns for f in INDEX_FILES.values() if (path / f).is_file())
    key = (str(path), stamps)  # a rebuilt index is opened again
    with _OPEN_LOCK:
        if key not in _OPEN:
            _OPEN[key] = LocalIndex(path)
        return _OPEN[key]
