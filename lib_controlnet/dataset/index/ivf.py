"""The coarse k-means and the list assignment of an IVF build, with numpy's matrix product.

faiss trains an IVF index's coarse quantizer and assigns every added vector to its list through an IndexFlat
search. On the faiss-cpu wheels that search runs at a quarter of the speed numpy's OpenBLAS reaches for the same
product (measured on 2 cores: 40 against 165 GFLOPS, 102400 x 768 vectors against 1024 centroids), and those
products are nearly all of the build's time. So the same work moves here: faiss' k-means as IndexIVF.train runs
it (the given sample, `cp.niter` iterations, seeded initial centroids drawn from the sample, subsampling to
`cp.max_points_per_centroid`, centroids re-normalised when `cp.spherical`, empty clusters split off large ones),
then the nearest centroid of each added vector, handed to faiss' `add_core`, which encodes and files it exactly as
`add` would. faiss still trains whatever comes after the quantizer (PQ / SQ codebooks). Indexes this does not
cover (a transform in front, a non-flat quantizer) are built by faiss alone.
"""
from __future__ import annotations

import contextlib
from typing import Optional

import numpy as np

BLOCK = 16384  # rows per product: a 16384 x nlist float32 score block (64 MiB at nlist 1024)


def plain_ivf(index):
    """`index` when it is an IVF index over a flat quantizer that trains in the usual way, else None."""
    import faiss

    if not isinstance(index, faiss.IndexIVF) or index.is_trained:
        return None
    alone = index.quantizer_trains_alone  # a C char: '\x00' (SWIG hands it over as a one-character str)
    if (ord(alone) if isinstance(alone, str) else alone) != 0:
        return None
    quantizer = faiss.downcast_index(index.quantizer)
    if type(quantizer) not in (faiss.IndexFlat, faiss.IndexFlatIP, faiss.IndexFlatL2):
        return None
    if quantizer.metric_type not in (faiss.METRIC_INNER_PRODUCT, faiss.METRIC_L2):
        return None
    return index


def blas_threads(cores: Optional[int]):
    """Hold numpy's BLAS to `cores` threads where threadpoolctl is installed (it usually is, with scikit-learn);
    without it numpy keeps its own count (OMP_NUM_THREADS / OPENBLAS_NUM_THREADS)."""
    if not cores:
        return contextlib.nullcontext()
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return contextlib.nullcontext()
    return threadpool_limits(limits=cores, user_api="blas")


def nearest(x: np.ndarray, centroids: np.ndarray, half_norms: Optional[np.ndarray]) -> np.ndarray:
    """Index of each row's nearest centroid: largest inner product, or for L2 the largest x.c - |c|^2 / 2
    (|x|^2 is the same for every centroid of a row)."""
    out = np.empty(len(x), dtype="int64")
    for start in range(0, len(x), BLOCK):
        scores = x[start:start + BLOCK] @ centroids.T
        if half_norms is not None:
            scores -= half_norms
        out[start:start + BLOCK] = scores.argmax(axis=1)
    return out


def _half_norms(index, centroids: np.ndarray) -> Optional[np.ndarray]:
    import faiss

    if index.quantizer.metric_type == faiss.METRIC_INNER_PRODUCT:
        return None
    return 0.5 * np.einsum("ij,ij->i", centroids, centroids)


def _split_empty(centroids: np.ndarray, counts: np.ndarray, rng: np.random.Generator) -> None:
    """faiss' split_clusters: an empty centroid takes a copy of one drawn in proportion to its size minus one,
    and the two move apart by a relative 1/1024 in opposite directions, each keeping half of the points."""
    eps = 1 / 1024
    sign = np.where(np.arange(centroids.shape[1]) % 2 == 0, 1.0, -1.0).astype("float32")
    for empty in np.flatnonzero(counts == 0):
        weights = np.maximum(counts - 1, 0).astype("float64")
        donor = rng.choice(len(counts), p=weights / weights.sum())
        centroids[empty] = centroids[donor] * (1 + eps * sign)
        centroids[donor] *= 1 - eps * sign
        counts[empty] = counts[donor] // 2
        counts[donor] -= counts[empty]


def train_quantizer(index, sample: np.ndarray) -> None:
    """Fill `index`'s flat quantizer with k-means centroids of `sample` (float32, C order); faiss' `train` then
    finds the quantizer trained and goes on to the rest."""
    cp, nlist = index.cp, index.nlist
    rng = np.random.default_rng(cp.seed)
    if len(sample) < nlist:
        raise ValueError(f"{len(sample)} training vectors are fewer than the {nlist} lists")
    if len(sample) > nlist * cp.max_points_per_centroid:
        sample = sample[np.sort(rng.choice(len(sample), nlist * cp.max_points_per_centroid, replace=False))]
    centroids = sample[rng.choice(len(sample), nlist, replace=False)].copy()
    for _ in range(cp.niter):
        assign = nearest(sample, centroids, _half_norms(index, centroids))
        counts = np.bincount(assign, minlength=nlist)
        order, end = np.argsort(assign, kind="stable"), np.cumsum(counts)  # each cluster's rows, in one run
        for c in np.flatnonzero(counts):  # 30x faster than np.add.reduceat along axis 0, no sorted copy
            sample[order[end[c] - counts[c]:end[c]]].sum(axis=0, out=centroids[c])
            centroids[c] /= counts[c]
        _split_empty(centroids, counts, rng)
        if cp.spherical:
            centroids /= np.maximum(np.linalg.norm(centroids, axis=1, keepdims=True), 1e-20)
    index.quantizer.reset()
    index.quantizer.add(centroids)


def add_assigned(index, x: np.ndarray, centroids: np.ndarray) -> None:
    """`index.add(x)` with the list assignment done here (`centroids`: the quantizer's, read out once); ids
    follow on from `index.ntotal` as with `add`."""
    import faiss

    lists = nearest(x, centroids, _half_norms(index, centroids))
    index.add_core(len(x), faiss.swig_ptr(x), None, faiss.swig_ptr(lists))
