"""The IVF build's own k-means and list assignment (dataset/index/ivf.py) against faiss doing the same work:
an index trained and filled by ivf.py files every vector in the list faiss' own `add` picks, searches as well
as one faiss trains itself, and keeps faiss' training of what follows the quantizer (PQ codebooks). Shards
stream through one buffer, float16 ones converted, a truncated one refused in one sentence."""
import faiss
import numpy as np
import pytest

from lib_controlnet.dataset.index import ivf
from lib_controlnet.dataset.index.build import IndexBuildError, _float32_chunks

DIM, N, NLIST = 32, 20_000, 64


def _data(seed=0, n=N):
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((NLIST * 2, DIM)).astype("float32")
    x = centers[rng.integers(0, len(centers), n)] + 0.4 * rng.standard_normal((n, DIM), dtype=np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _recall(index, x, queries, nprobe):
    faiss.extract_index_ivf(index).nprobe = nprobe
    _, found = index.search(queries, 10)
    exact = np.argsort(-(queries @ x.T), axis=1)[:, :10]
    return np.mean([len(set(a) & set(b)) / 10 for a, b in zip(found.tolist(), exact.tolist())])


@pytest.mark.parametrize("metric", [faiss.METRIC_INNER_PRODUCT, faiss.METRIC_L2], ids=["ip", "l2"])
def test_own_kmeans_and_assignment_match_faiss(metric):
    x, queries = _data(), _data(seed=1, n=1000)
    ours = faiss.index_factory(DIM, f"IVF{NLIST},Flat", metric)
    assert ivf.plain_ivf(ours) is ours
    ivf.train_quantizer(ours, x[:6400])
    centroids = ours.quantizer.reconstruct_n(0, NLIST)
    if metric == faiss.METRIC_INNER_PRODUCT:  # spherical k-means, as faiss runs it for inner product
        np.testing.assert_allclose(np.linalg.norm(centroids, axis=1), 1, rtol=1e-5)
    ours.train(x[:6400])
    np.testing.assert_array_equal(ours.quantizer.reconstruct_n(0, NLIST), centroids)  # faiss kept them
    for start in range(0, N, 7000):
        ivf.add_assigned(ours, np.ascontiguousarray(x[start:start + 7000]), centroids)
    assert ours.ntotal == N

    # faiss' own add on the same quantizer files each vector in the same list (ties aside)
    same = faiss.index_factory(DIM, f"IVF{NLIST},Flat", metric)
    same.quantizer.add(centroids)
    same.train(x[:6400])
    same.add(x)
    ours_lists = {i: set(faiss.rev_swig_ptr(ours.invlists.get_ids(i), ours.invlists.list_size(i)))
                  for i in range(NLIST)}
    same_lists = {i: set(faiss.rev_swig_ptr(same.invlists.get_ids(i), same.invlists.list_size(i)))
                  for i in range(NLIST)}
    moved = sum(len(ours_lists[i] ^ same_lists[i]) for i in range(NLIST)) / 2
    assert moved <= N * 0.001, moved

    # and its k-means is as good as faiss' from the same sample: the mean best inner product (the objective) and
    # recall over 1000 queries (seeds alone move these by ~0.01 and ~0.03; a k-means that does not converge
    # falls far below)
    theirs = faiss.index_factory(DIM, f"IVF{NLIST},Flat", metric)
    theirs.train(x[:6400])
    theirs.add(x)
    if metric == faiss.METRIC_INNER_PRODUCT:
        fit = {name: float((x @ index.quantizer.reconstruct_n(0, NLIST).T).max(axis=1).mean())
               for name, index in (("ours", ours), ("theirs", theirs))}
        assert fit["ours"] >= fit["theirs"] - 0.015, fit
    assert _recall(ours, x, queries, 8) >= _recall(theirs, x, queries, 8) - 0.05


def test_codes_after_the_quantizer_are_still_trained_by_faiss():
    x = _data()
    index = faiss.index_factory(DIM, f"IVF{NLIST},PQ4x4", faiss.METRIC_INNER_PRODUCT)
    ivf.train_quantizer(index, x[:6400])
    index.train(x[:6400])
    assert index.is_trained and index.pq.centroids.size() == 4 * 16 * (DIM // 4)  # PQ codebooks trained
    ivf.add_assigned(index, x, index.quantizer.reconstruct_n(0, NLIST))
    assert index.ntotal == N
    assert ivf.plain_ivf(faiss.index_factory(DIM, "OPQ8,IVF16,PQ8", faiss.METRIC_INNER_PRODUCT)) is None
    assert ivf.plain_ivf(faiss.index_factory(DIM, "HNSW8", faiss.METRIC_INNER_PRODUCT)) is None


def test_shards_stream_in_chunks_float16_converted_truncated_refused(tmp_path):
    x = _data(n=1000)
    np.save(tmp_path / "a.npy", x.astype("float16"))
    chunks = [chunk.copy() for chunk in _float32_chunks(tmp_path / "a.npy", 300)]
    assert [len(c) for c in chunks] == [300, 300, 300, 100] and chunks[0].dtype == np.float32
    np.testing.assert_array_equal(np.concatenate(chunks), x.astype("float16").astype("float32"))
    np.save(tmp_path / "b.npy", x)
    data = (tmp_path / "b.npy").read_bytes()
    (tmp_path / "b.npy").write_bytes(data[:-DIM * 4 * 10])
    with pytest.raises(IndexBuildError, match="truncated"):
        list(_float32_chunks(tmp_path / "b.npy", 300))


def test_memory_sizes_read_as_autofaiss_reads_them():
    from lib_controlnet.dataset.index.build import _memory_bytes

    assert _memory_bytes("4G", "--max-index-memory") == 4 * 2**30
    assert _memory_bytes("1.5gb", "--max-index-memory") == 1.5 * 2**30
    assert _memory_bytes("512M", "--max-index-memory") == 512 * 2**20
    with pytest.raises(IndexBuildError, match="--max-index-memory 'lots' is not a memory size"):
        _memory_bytes("lots", "--max-index-memory")


def test_more_lists_than_vectors_is_one_sentence(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from lib_controlnet.dataset.index.build import IndexBuildConfig, build_local_index

    (tmp_path / "emb" / "img_emb").mkdir(parents=True)
    (tmp_path / "emb" / "metadata").mkdir()
    np.save(tmp_path / "emb" / "img_emb" / "img_emb_0.npy", _data(n=50))
    pq.write_table(pa.table({"url": [f"https://example.com/{i}.jpg" for i in range(50)]}),
                   tmp_path / "emb" / "metadata" / "metadata_0.parquet")
    with pytest.raises(IndexBuildError, match="has 64 lists but there are only 50 vectors"):
        build_local_index(IndexBuildConfig(out_dir=str(tmp_path / "index"), embeddings_dir=str(tmp_path / "emb"),
                                           index_key=f"IVF{NLIST},Flat"), say=lambda line: None)
    assert not (tmp_path / "index" / "image.index").exists()
