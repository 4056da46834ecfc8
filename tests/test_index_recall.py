"""The compressed index against exact search: recall@10 >= 0.95 on 100k random vectors, built the way a user
builds from precomputed embeddings (img_emb/*.npy + metadata/*.parquet, a fixed IVF-SQ8 key: 1 byte a dimension)
and searched as LocalIndex searches: candidates from the compressed index, re-ranked with the memory-mapped
vectors the index was built from."""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

N, DIM, CLUSTERS, QUERIES = 100_000, 64, 500, 100


def _vectors(rng, n, centers):
    """Random vectors around random centres (CLIP embeddings are clustered too), unit length."""
    x = centers[rng.integers(0, len(centers), n)] + 0.3 * rng.standard_normal((n, DIM)).astype("float32")
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype("float32")


def test_compressed_index_recall_at_10(tmp_path):
    from lib_controlnet.dataset.index.build import IndexBuildConfig, build_local_index
    from lib_controlnet.dataset.index.search import LocalIndex

    rng = np.random.default_rng(0)
    centers = rng.standard_normal((CLUSTERS, DIM)).astype("float32")
    data = _vectors(rng, N, centers)
    emb = tmp_path / "emb"
    (emb / "img_emb").mkdir(parents=True)
    (emb / "metadata").mkdir()
    for shard, start in enumerate(range(0, N, N // 2)):
        np.save(emb / "img_emb" / f"img_emb_{shard}.npy", data[start:start + N // 2])
        urls = [f"https://example.com/{i}.jpg" for i in range(start, start + N // 2)]
        pq.write_table(pa.table({"url": urls, "caption": [f"c{i}" for i in range(start, start + N // 2)]}),
                       emb / "metadata" / f"metadata_{shard}.parquet")
    info = build_local_index(IndexBuildConfig(
        out_dir=str(tmp_path / "index"), embeddings_dir=str(emb), index_key="IVF128,SQ8", index_param="nprobe=24",
        max_index_memory="1G", current_memory="4G", nb_cores=2), say=lambda line: None)
    assert info["count"] == N and info["dim"] == DIM

    index = LocalIndex(tmp_path / "index")
    assert index.indexes["image"].code_size == DIM  # compressed: one byte per dimension, not four
    queries = _vectors(rng, QUERIES, centers)
    exact = np.argsort(-(queries @ data.T), axis=1)[:, :10]
    _, raw = index.indexes["image"].search(queries, 10)  # the codes alone, before the exact re-ranking
    raw_recall = np.mean([len(set(r) & set(t)) / 10 for r, t in zip(raw.tolist(), exact.tolist())])
    hits = 0
    for query, truth in zip(queries, exact):
        rows = index.search(query, num_images=10, deduplicate=False)
        assert rows[0]["url"] == f"https://example.com/{rows[0]['id']}.jpg"  # metadata paired with the vector
        hits += len({row["id"] for row in rows} & set(truth.tolist()))
    recall = hits / (10 * QUERIES)
    print(f"recall@10 = {recall:.3f} (compressed codes alone: {raw_recall:.3f})")
    assert recall >= 0.95
