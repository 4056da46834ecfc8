"""The local CLIP index against its peers, in one run (ratios printed):

    .venv/bin/python benchmarks/bench_index.py [--quick] [--vectors N] [--dim D] [--full] [--default-key]
        [--clip-retrieval-python SIDE_VENV/bin/python] [--queries Q]

1. Build: `dataset index build --embeddings` (our build with a fixed key: faiss, with the IVF coarse k-means and
   list assignment done by numpy's matrix product, lib_controlnet/dataset/index/ivf.py) against autofaiss'
   `build_index` alone with the same key, parameters and memory budget, on the same random vectors (npy shards +
   metadata, clip-retrieval's layout). Each side runs in a fresh process; runs alternate; the median time and
   the largest peak RSS (each process' own VmHWM) are kept. What is timed: each side's timer starts after its
   own imports (ours: the build module and faiss, plus autofaiss with --default-key; autofaiss': autofaiss, which
   imports faiss) and stops when its index file is on disk, so both cover the same work: read the vectors,
   train, add, write (autofaiss also measures its index's search speed; ours also checks the shards against
   their metadata and copies the metadata). The whole process (start-up and imports included: ours imports
   torch with the `lib_controlnet` package) is printed beside it. Both indexes are then scored the same way:
   recall@10 against exact search for 500 queries at their stored search parameters.
   Default 100k x 768 (`--quick`: 50k); `--full`: 1M x 768 (~3 GB of vectors; each build process peaks near
   4.5 GB, the benchmark itself near 2 GB). Budgets: --max-index-memory 1G, --current-memory 2G; 4G and 8G once
   the vectors pass 0.9 GiB. Target: time <= 1.0x, peak memory within --current-memory.
   `--default-key`: both sides without a key (autofaiss picks one and tunes its search parameters; ours hands
   the build to autofaiss after its checks, so this measures our overhead).
2. Query latency (needs clip-retrieval, which cannot live beside the WebUI's pins: install it in a side venv and
   name its python with --clip-retrieval-python): `dataset index serve` against clip-retrieval's own
   `clip_back` serving the same index folder on 127.0.0.1, ClipClient-shaped requests with `embedding_input`
   (no CLIP forward on either side), 40 results, interleaved one by one. p50/p95 per side. Target <= 1.0x.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
KEY = "IVF1024,Flat"  # a key both builders take for inner-product search (autofaiss refuses IVF-SQ/PQ ones)
PARAM = "nprobe=16"

PEER = r"""
import json, logging, resource, sys, time
from autofaiss import build_index
def hwm_kb():  # this process' own peak RSS; ru_maxrss would carry the benchmark's over fork/exec
    try:
        return int(next(l for l in open("/proc/self/status") if l.startswith("VmHWM")).split()[1])
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
a = json.loads(sys.argv[1])
base_kb = hwm_kb()
start = time.perf_counter()
index, _ = build_index(embeddings=a["emb"], index_path=a["out"] + "/image.index", index_infos_path=a["out"] + "/image.json",
                       index_key=a["key"], index_param=a["param"], max_index_memory_usage=a["max"],
                       current_memory_available=a["cur"], nb_cores=a["cores"], metric_type="ip", verbose=logging.WARNING)
assert index is not None
print(json.dumps({"seconds": time.perf_counter() - start, "peak_kb": hwm_kb(), "base_kb": base_kb}))
"""

OURS = r"""
import json, resource, sys, time
sys.path.insert(0, sys.argv[2])
import faiss
from lib_controlnet.dataset.index.build import IndexBuildConfig, build_local_index
a = json.loads(sys.argv[1])
if a["key"] is None:  # this path hands the build to autofaiss: imported before the timer, as the peer's
    import autofaiss
def hwm_kb():  # this process' own peak RSS; ru_maxrss would carry the benchmark's over fork/exec
    try:
        return int(next(l for l in open("/proc/self/status") if l.startswith("VmHWM")).split()[1])
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
base_kb = hwm_kb()
start = time.perf_counter()
build_local_index(IndexBuildConfig(out_dir=a["out"], embeddings_dir=a["root"], index_key=a["key"], index_param=a["param"],
                                   max_index_memory=a["max"], current_memory=a["cur"], nb_cores=a["cores"]), say=lambda s: None)
print(json.dumps({"seconds": time.perf_counter() - start, "peak_kb": hwm_kb(), "base_kb": base_kb}))
"""


def write_embeddings(root: Path, count: int, dim: int, shards: int = 4) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(0)
    centers = rng.standard_normal((256, dim)).astype("float32")
    (root / "img_emb").mkdir(parents=True)
    (root / "metadata").mkdir()
    per = count // shards
    for shard in range(shards):
        x = centers[rng.integers(0, 256, per)] + 0.5 * rng.standard_normal((per, dim), dtype=np.float32)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        np.save(root / "img_emb" / f"img_emb_{shard:04d}.npy", x)
        ids = range(shard * per, (shard + 1) * per)
        pq.write_table(pa.table({"url": [f"https://example.com/{i}.jpg" for i in ids],
                                 "caption": [f"caption {i}" for i in ids]}),
                       root / "metadata" / f"metadata_{shard:04d}.parquet")


def run_side(code: str, args: dict, python: str = sys.executable) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(args["cores"]))
    start = time.perf_counter()
    done = subprocess.run([python, "-c", code, json.dumps(args), str(ROOT)], capture_output=True, text=True, env=env)
    process_seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(done.stderr[-3000:])
    return {**json.loads(done.stdout.strip().splitlines()[-1]), "process_seconds": process_seconds}


def recall_at_10(root: Path, index_path: Path, queries: int = 500) -> float:
    """recall@10 of the index at its stored search parameters against exact inner-product search, the queries
    being stored vectors plus noise; shards are read one at a time, the index memory-mapped."""
    import faiss

    shards = sorted((root / "img_emb").glob("*.npy"))
    sizes = [len(np.load(p, mmap_mode="r")) for p in shards]
    rng = np.random.default_rng(5)
    picks = np.sort(rng.choice(sum(sizes), queries, replace=False))
    starts = np.cumsum([0] + sizes)
    q = np.concatenate([np.load(p, mmap_mode="r")[picks[(picks >= a) & (picks < b)] - a]
                        for p, a, b in zip(shards, starts, starts[1:])]).astype("float32")
    q += 0.3 * rng.standard_normal(q.shape).astype("float32")
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    best_s, best_i = np.full((queries, 0), -np.inf, "float32"), np.zeros((queries, 0), "int64")
    for path, offset in zip(shards, starts):
        scores = q @ np.load(path).T
        top = np.argpartition(-scores, 10, axis=1)[:, :10]
        best_s = np.concatenate([best_s, np.take_along_axis(scores, top, 1)], 1)
        best_i = np.concatenate([best_i, top + offset], 1)
        keep = np.argsort(-best_s, axis=1)[:, :10]
        best_s, best_i = np.take_along_axis(best_s, keep, 1), np.take_along_axis(best_i, keep, 1)
    index = faiss.read_index(str(index_path), faiss.IO_FLAG_MMAP)
    _, found = index.search(q, 10)
    return float(np.mean([len(set(a) & set(b)) / 10 for a, b in zip(found.tolist(), best_i.tolist())]))


def bench_build(root: Path, work: Path, repeats: int, budget: dict, key: Optional[str], param: Optional[str]) -> Path:
    results = {"ours": [], "autofaiss": []}
    last = {}
    for repeat in range(repeats):
        for side in ("ours", "autofaiss") if repeat % 2 == 0 else ("autofaiss", "ours"):
            out = work / f"{side}-{repeat}"
            out.mkdir(parents=True)
            args = {"root": str(root), "emb": str(root / "img_emb"), "out": str(out), "key": key, "param": param,
                    **budget}
            results[side].append(run_side(OURS if side == "ours" else PEER, args))
            last[side] = out
    t = {s: statistics.median(r["seconds"] for r in v) for s, v in results.items()}
    p = {s: statistics.median(r["process_seconds"] for r in v) for s, v in results.items()}
    m = {s: max(r["peak_kb"] for r in v) / 1024 for s, v in results.items()}
    # what the build itself added over the process after its imports (ours imports torch with the package)
    grew = {s: max(r["peak_kb"] - r["base_kb"] for r in v) / 1024 for s, v in results.items()}
    size = (last["ours"] / "image.index").stat().st_size / 2**20
    print(f"build {key or '(autofaiss picks the key)'}, {repeats} run(s) each: ours {t['ours']:.1f} s, peak "
          f"{m['ours']:.0f} MiB | autofaiss alone {t['autofaiss']:.1f} s, peak {m['autofaiss']:.0f} MiB | time ratio "
          f"{t['ours'] / t['autofaiss']:.2f}x (runs: ours {_runs(results['ours'])}, autofaiss "
          f"{_runs(results['autofaiss'])}), memory ratio {m['ours'] / m['autofaiss']:.2f}x")
    print(f"  whole process, start-up and imports included: ours {p['ours']:.1f} s, autofaiss {p['autofaiss']:.1f} s, "
          f"{p['ours'] / p['autofaiss']:.2f}x | build alone, over the imports: ours {grew['ours']:.0f} MiB, autofaiss "
          f"{grew['autofaiss']:.0f} MiB, {grew['ours'] / max(grew['autofaiss'], 1):.2f}x | index {size:.0f} MiB "
          f"(budget {budget['max']}), build memory budget {budget['cur']}: "
          f"{'within' if m['ours'] * 2**20 < _bytes(budget['cur']) else 'OVER'}")
    recall = {s: recall_at_10(root, last[s] / "image.index") for s in last}
    print(f"  recall@10 against exact search, 500 queries: ours {recall['ours']:.3f}, autofaiss "
          f"{recall['autofaiss']:.3f}")
    return last["ours"]


def _runs(results: list) -> str:
    return "/".join(f"{r['seconds']:.1f}" for r in results)


def _bytes(text: str) -> int:
    return int(float(text[:-1]) * {"K": 2**10, "M": 2**20, "G": 2**30}[text[-1]])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(url: str, process, seconds: float = 300) -> None:
    import requests

    deadline = time.time() + seconds
    while time.time() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"server exited ({process.returncode}) before answering {url}")
        try:
            if requests.get(url, timeout=2).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(0.5)
    raise SystemExit(f"{url} did not answer in {seconds} s")


def bench_query(index: Path, side_python: str, queries: int) -> None:
    import requests

    ports = {"ours": _free_port(), "clip-retrieval back": _free_port()}
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    procs = {
        "ours": subprocess.Popen([sys.executable, "-m", "lib_controlnet", "dataset", "index", "serve", str(index),
                                  "--port", str(ports["ours"])], env=env, stdout=subprocess.DEVNULL,
                                 stderr=subprocess.DEVNULL),
        "clip-retrieval back": subprocess.Popen([side_python, str(ROOT / "benchmarks" / "_clip_back_runner.py"),
                                                 str(index), str(ports["clip-retrieval back"])],
                                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL),
    }
    try:
        for side, port in ports.items():
            _wait(f"http://127.0.0.1:{port}/indices-list", procs[side])
        dim = json.loads((index / "index_info.json").read_text())["dim"]
        rng = np.random.default_rng(1)
        sessions = {side: requests.Session() for side in ports}
        times = {side: [] for side in ports}
        for q in range(queries + 5):
            vector = rng.standard_normal(dim)
            vector = (vector / np.linalg.norm(vector)).tolist()
            body = {"text": None, "image": None, "image_url": None, "embedding_input": vector, "deduplicate": False,
                    "use_safety_model": False, "use_violence_detector": False, "indice_name": index.name,
                    "use_mclip": False, "aesthetic_score": "", "aesthetic_weight": "", "modality": "image",
                    "num_images": 40, "num_result_ids": 40}
            order = list(ports) if q % 2 == 0 else list(ports)[::-1]
            answers = {}
            for side in order:
                start = time.perf_counter()
                response = sessions[side].post(f"http://127.0.0.1:{ports[side]}/knn-service", data=json.dumps(body),
                                               timeout=60)
                elapsed = time.perf_counter() - start
                answers[side] = response.json()
                if q >= 5:  # warm-up queries are not counted
                    times[side].append(elapsed * 1000)
            assert all(isinstance(a, list) and len(a) == 40 for a in answers.values()), answers
        stats = {s: (np.percentile(v, 50), np.percentile(v, 95)) for s, v in times.items()}
        ours, peer = stats["ours"], stats["clip-retrieval back"]
        print(f"query latency over {queries} queries, 40 results: ours p50 {ours[0]:.2f} ms p95 {ours[1]:.2f} ms | "
              f"clip-retrieval back p50 {peer[0]:.2f} ms p95 {peer[1]:.2f} ms | ratio p50 {ours[0] / peer[0]:.2f}x, "
              f"p95 {ours[1] / peer[1]:.2f}x")
    finally:
        for process in procs.values():
            process.kill()
            process.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="50k vectors, one build each")
    parser.add_argument("--full", action="store_true", help="1M x 768 vectors (~3 GB on disk; builds peak near 4.5 GB)")
    parser.add_argument("--vectors", type=int, default=None)
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--default-key", action="store_true",
                        help=f"no index key on either side (autofaiss picks; default: {KEY}, {PARAM})")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--cores", type=int, default=os.cpu_count())
    parser.add_argument("--clip-retrieval-python", default=os.environ.get("CLIP_RETRIEVAL_PYTHON"),
                        help="python of a venv with clip-retrieval installed (query latency against its back)")
    args = parser.parse_args()
    count = args.vectors or (1_000_000 if args.full else 50_000 if args.quick else 100_000)
    repeats = args.repeats or (1 if args.quick or args.full else 3)
    big = count * args.dim * 4 > 0.9 * 2**30  # an IVF-Flat index holds the vectors whole
    budget = {"max": "4G" if big else "1G", "cur": "8G" if big else "2G", "cores": args.cores}
    with tempfile.TemporaryDirectory(prefix="bench-index-") as tmp:
        root = Path(tmp) / "embeddings"
        write_embeddings(root, count, args.dim)
        print(f"{count} x {args.dim} random vectors (clustered), {args.cores} cores")
        key, param = (None, None) if args.default_key else (KEY, PARAM)
        index = bench_build(root, Path(tmp) / "builds", repeats, budget, key, param)
        if args.clip_retrieval_python:
            bench_query(index, args.clip_retrieval_python, args.queries)
        else:
            print("query latency: skipped (give --clip-retrieval-python SIDE_VENV/bin/python, a venv with "
                  "clip-retrieval installed)")


if __name__ == "__main__":
    main()
