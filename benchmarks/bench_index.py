"""The local CLIP index against its peers, in one run (ratios printed):

    .venv/bin/python benchmarks/bench_index.py [--quick] [--vectors N] [--dim D] [--full]
        [--clip-retrieval-python SIDE_VENV/bin/python] [--queries Q]

1. Build: `dataset index build --embeddings` (our build with a fixed key: faiss streaming from memory-mapped
   shards) against autofaiss' `build_index` alone with the same key, parameters and memory budget, on the same
   random vectors (npy shards + metadata, clip-retrieval's layout). Each side runs in a fresh process (start-up
   included for both), runs alternate, the median time and the largest peak RSS are kept. Default 100k x 768
   (`--quick`: 50k); `--full`: 1M x 768 (~3 GB of vectors; needs ~8 GB of RAM). Target: time <= 1.0x, peak
   memory within --current-memory.
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

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
KEY = "IVF1024,Flat"  # a key both builders take for inner-product search (autofaiss refuses IVF-SQ/PQ ones)
PARAM = "nprobe=16"

PEER = r"""
import json, logging, resource, sys, time
from autofaiss import build_index
a = json.loads(sys.argv[1])
base_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
start = time.perf_counter()
index, _ = build_index(embeddings=a["emb"], index_path=a["out"] + "/image.index", index_infos_path=a["out"] + "/image.json",
                       index_key=a["key"], index_param=a["param"], max_index_memory_usage=a["max"],
                       current_memory_available=a["cur"], nb_cores=a["cores"], metric_type="ip", verbose=logging.WARNING)
assert index is not None
print(json.dumps({"seconds": time.perf_counter() - start, "peak_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, "base_kb": base_kb}))
"""

OURS = r"""
import json, resource, sys, time
sys.path.insert(0, sys.argv[2])
from lib_controlnet.dataset.index.build import IndexBuildConfig, build_local_index
a = json.loads(sys.argv[1])
base_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
start = time.perf_counter()
build_local_index(IndexBuildConfig(out_dir=a["out"], embeddings_dir=a["root"], index_key=a["key"], index_param=a["param"],
                                   max_index_memory=a["max"], current_memory=a["cur"], nb_cores=a["cores"]), say=lambda s: None)
print(json.dumps({"seconds": time.perf_counter() - start, "peak_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, "base_kb": base_kb}))
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
        x = centers[rng.integers(0, 256, per)] + 0.5 * rng.standard_normal((per, dim)).astype("float32")
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        np.save(root / "img_emb" / f"img_emb_{shard:04d}.npy", x)
        ids = range(shard * per, (shard + 1) * per)
        pq.write_table(pa.table({"url": [f"https://example.com/{i}.jpg" for i in ids],
                                 "caption": [f"caption {i}" for i in ids]}),
                       root / "metadata" / f"metadata_{shard:04d}.parquet")


def run_side(code: str, args: dict, python: str = sys.executable) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(args["cores"]))
    done = subprocess.run([python, "-c", code, json.dumps(args), str(ROOT)], capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise SystemExit(done.stderr[-3000:])
    return json.loads(done.stdout.strip().splitlines()[-1])


def bench_build(root: Path, work: Path, repeats: int, budget: dict) -> Path:
    results = {"ours": [], "autofaiss": []}
    last_ours = None
    for repeat in range(repeats):
        for side in ("ours", "autofaiss"):
            out = work / f"{side}-{repeat}"
            out.mkdir(parents=True)
            args = {"root": str(root), "emb": str(root / "img_emb"), "out": str(out), "key": KEY, "param": PARAM,
                    **budget}
            results[side].append(run_side(OURS if side == "ours" else PEER, args))
            if side == "ours":
                last_ours = out
    t = {s: statistics.median(r["seconds"] for r in v) for s, v in results.items()}
    m = {s: max(r["peak_kb"] for r in v) / 1024 for s, v in results.items()}
    # what the build itself added over the process after its imports (ours imports torch with the package)
    grew = {s: max(r["peak_kb"] - r["base_kb"] for r in v) / 1024 for s, v in results.items()}
    size = (last_ours / "image.index").stat().st_size / 2**20
    print(f"build {KEY}: ours {t['ours']:.1f} s, peak {m['ours']:.0f} MiB | autofaiss alone {t['autofaiss']:.1f} s, "
          f"peak {m['autofaiss']:.0f} MiB | time ratio {t['ours'] / t['autofaiss']:.2f}x, memory ratio "
          f"{m['ours'] / m['autofaiss']:.2f}x (build alone, over the imports: ours {grew['ours']:.0f} MiB, autofaiss "
          f"{grew['autofaiss']:.0f} MiB, {grew['ours'] / max(grew['autofaiss'], 1):.2f}x) | index {size:.0f} MiB (budget {budget['max']}), build memory budget "
          f"{budget['cur']}: {'within' if m['ours'] * 2**20 < _bytes(budget['cur']) else 'OVER'}")
    return last_ours


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
    parser.add_argument("--full", action="store_true", help="1M x 768 vectors (~3 GB; needs ~8 GB of RAM)")
    parser.add_argument("--vectors", type=int, default=None)
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--cores", type=int, default=os.cpu_count())
    parser.add_argument("--clip-retrieval-python", default=os.environ.get("CLIP_RETRIEVAL_PYTHON"),
                        help="python of a venv with clip-retrieval installed (query latency against its back)")
    args = parser.parse_args()
    count = args.vectors or (1_000_000 if args.full else 50_000 if args.quick else 100_000)
    repeats = args.repeats or (1 if args.quick or args.full else 3)
    budget = {"max": "4G" if args.full else "1G", "cur": "8G" if args.full else "2G", "cores": args.cores}
    with tempfile.TemporaryDirectory(prefix="bench-index-") as tmp:
        root = Path(tmp) / "embeddings"
        write_embeddings(root, count, args.dim)
        print(f"{count} x {args.dim} random vectors (clustered), {args.cores} cores")
        index = bench_build(root, Path(tmp) / "builds", repeats, budget)
        if args.clip_retrieval_python:
            bench_query(index, args.clip_retrieval_python, args.queries)
        else:
            print("query latency: skipped (give --clip-retrieval-python SIDE_VENV/bin/python, a venv with "
                  "clip-retrieval installed)")


if __name__ == "__main__":
    main()
