"""Searching a local index. The compressed index against exact search: recall@10 >= 0.95 on 100k random vectors, built the way a user
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


def test_dedup_filters_and_remote_results(tmp_path):
    """Near-duplicate vectors collapse to the best one; punsafe / NSFW / aesthetic columns filter when present;
    results whose metadata holds http(s) urls (a LAION slice) go to the download stage as remote candidates."""
    from lib_controlnet.dataset.config import BuildConfig
    from lib_controlnet.dataset.download import split_candidates
    from lib_controlnet.dataset.index.build import IndexBuildConfig, build_local_index
    from lib_controlnet.dataset.index.search import LocalIndex
    from lib_controlnet.dataset.safety import policy_for
    from lib_controlnet.dataset.sources import collect
    from tiny_clip import write_tiny_clip

    rng = np.random.default_rng(3)
    base = rng.standard_normal((6, 16)).astype("float32")
    vectors = np.concatenate([base, base[:2] + 0.01 * rng.standard_normal((2, 16)).astype("float32")])
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)  # rows 6 and 7 near-duplicate rows 0 and 1
    (tmp_path / "emb" / "img_emb").mkdir(parents=True)
    (tmp_path / "emb" / "metadata").mkdir()
    np.save(tmp_path / "emb" / "img_emb" / "img_emb_0.npy", vectors)
    pq.write_table(pa.table({"url": [f"https://example.com/{i}.jpg" for i in range(8)],
                             "punsafe": [0.9, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1],
                             "NSFW": ["UNLIKELY", "NSFW", "UNLIKELY", "UNSURE", "UNLIKELY", "UNLIKELY", "", ""],
                             "aesthetic": [6.0, 6.0, 4.0, 6.5, 5.5, 7.0, 6.0, 6.0]}),
                   tmp_path / "emb" / "metadata" / "metadata_0.parquet")
    config, weights = write_tiny_clip(tmp_path / "model", embed_dim=16)  # the model the vectors "came from"
    build_local_index(IndexBuildConfig(out_dir=str(tmp_path / "index"), embeddings_dir=str(tmp_path / "emb"),
                                       clip_model=str(config), clip_weights=str(weights), index_key="Flat"),
                      say=lambda line: None)
    index = LocalIndex(tmp_path / "index")
    query = (vectors[0] + vectors[1]) / 2
    everything = {r["id"] for r in index.search(query, num_images=8, deduplicate=False)}
    assert everything == set(range(8))
    unique = {r["id"] for r in index.search(query, num_images=8, deduplicate=True)}
    # 6 and 7 joined 0 and 1 (cosine > 0.94); the better-ranked one of each pair is kept
    assert {2, 3, 4, 5} < unique and len(unique) == 6 and len(unique & {0, 6}) == len(unique & {1, 7}) == 1
    safe = {r["id"] for r in index.search(query, num_images=8, deduplicate=False, use_safety_model=True)}
    assert safe == {2, 3, 4, 5, 6, 7}  # 0: punsafe 0.9, 1: NSFW
    pretty = {r["id"] for r in index.search(query, num_images=8, deduplicate=False, aesthetic_score=6)}
    assert pretty == {0, 1, 3, 5, 6, 7}

    build = BuildConfig(out_dir=str(tmp_path / "ds"), knn_url=str(tmp_path / "index"), prompts=["a photo"],
                        num_images=3, deduplicate=False, use_safety_model=False)
    rows = collect(build)
    assert len(rows) == 3 and {r["source"] for r in rows} == {"local_index"}
    assert all(r["url"].startswith("https://example.com/") for r in rows)
    remote, local, refused = split_candidates(rows, policy_for(build))
    assert len(remote) == 3 and not local and not refused


def test_build_from_a_url_list_goes_through_the_download_stage(tmp_path):
    """A URL list (csv: url, caption) -> img2dataset on a loopback host -> vectors with their urls; a URL that
    fails to download is counted as left out."""
    from servers import serve

    from lib_controlnet.dataset.index.build import IndexBuildConfig, build_local_index
    from tiny_clip import write_tiny_clip

    config, weights = write_tiny_clip(tmp_path / "model")
    with serve("image_host.py") as base:
        urls = [f"{base}/good/{i}.jpg" for i in range(5)] + [f"{base}/missing.png"]
        (tmp_path / "list.csv").write_text("url,caption\n" + "".join(f"{u},photo {i}\n" for i, u in enumerate(urls)))
        info = build_local_index(IndexBuildConfig(
            out_dir=str(tmp_path / "index"), url_list=str(tmp_path / "list.csv"), clip_model=str(config),
            clip_weights=str(weights), index_key="Flat", allow_private_urls=True), say=lambda line: None)
    assert info["count"] == 5 and info["skipped_images"] == 1 and info["text_index"]
    meta = pq.read_table(tmp_path / "index" / "metadata" / "metadata_00000.parquet").to_pylist()
    assert sorted(m["url"] for m in meta) == sorted(urls[:5])
