"""Dataset builder throughput on a loopback image host, against img2dataset alone, in the same run.

    .venv/bin/python benchmarks/bench_dataset.py [--quick] [--images N] [--size PX] [--repeats R]

1. Download stage: our run_download (img2dataset in its own process group, URL guard in its workers) vs
   `img2dataset.download` alone in a fresh process, same URL parquet, same options, same host. Both timed from
   launch to exit (process start-up included for both); runs alternate; the median is kept. Target >= 0.9x.
2. End to end: retrieve (knn service on loopback) -> download -> source captions -> canny maps -> write,
   images/s and seconds per stage from the manifest.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
# tests/ itself, not the `tests` package: some packages (autofaiss) install a top-level `tests` that would win
sys.path.insert(1, str(ROOT / "tests"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import lib_controlnet  # noqa: E402,F401  (torchvision repair first)
from servers import serve  # noqa: E402

PEER = r"""
import json, sys
import img2dataset
img2dataset.download(**json.loads(sys.argv[1]))
"""


def candidates(base: str, count: int, size: int) -> list[dict]:
    return [{"url": f"{base}/good/{i}.jpg?w={size}&h={size}", "caption": f"modern room {i}", "similarity": 0.5,
             "source_id": str(i), "query": "bench", "source": "url_list"} for i in range(count)]


def ours(config, rows, work: Path) -> float:
    from lib_controlnet.dataset.download import run_download

    start = time.perf_counter()
    run_download(config, rows, work, lambda done, total: None)
    return time.perf_counter() - start


def peer(config, rows, work: Path) -> float:
    from lib_controlnet.dataset.download import img2dataset_arguments, prepare_url_list

    work.mkdir(parents=True)
    url_list = prepare_url_list(rows, work / "urls.parquet")
    arguments = img2dataset_arguments(config, url_list, work / "out")
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", PEER, json.dumps(arguments)], check=True, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def warm(rows: list[dict]) -> None:
    import urllib.request
    from multiprocessing.pool import ThreadPool

    with ThreadPool(16) as pool:
        pool.map(lambda r: urllib.request.urlopen(r["url"], timeout=30).read(), rows)


def successes(folder: Path) -> int:
    import pyarrow.parquet as pq

    return sum(sum(1 for s in pq.read_table(p, columns=["status"]).column("status").to_pylist() if s == "success")
               for p in folder.rglob("[0-9]*.parquet"))


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="300 images, one repeat (~2 minutes on a busy 2-core box)")
    parser.add_argument("--images", type=int, default=None)
    parser.add_argument("--size", type=int, default=256, help="served image side in pixels")
    parser.add_argument("--repeats", type=int, default=None)
    args = parser.parse_args()
    count = args.images or (300 if args.quick else 800)
    repeats = args.repeats or (1 if args.quick else 2)

    from lib_controlnet.dataset.config import BuildConfig
    from lib_controlnet.dataset.job import run_build

    tmp = Path(tempfile.mkdtemp(prefix="bench-dataset-"))
    with serve("image_host.py") as host:
        rows = candidates(host, count, args.size)
        config = BuildConfig(out_dir=str(tmp), image_size=128, thread_count=16, processes_count=1,
                             samples_per_shard=max(50, count // 4), allow_private_urls=True, retries=0, timeout=10)
        warm(rows)  # the host renders each image once; neither side should pay for that
        times = {"ours": [], "img2dataset": []}
        for r in range(repeats):
            order = [("ours", ours), ("img2dataset", peer)] if r % 2 == 0 else [("img2dataset", peer), ("ours", ours)]
            for name, fn in order:
                work = tmp / f"{name}-{r}"
                seconds = fn(config, rows, work)
                got = successes(work)
                assert got == count, f"{name} downloaded {got} of {count}"
                times[name].append(seconds)
        ours_s, peer_s = statistics.median(times["ours"]), statistics.median(times["img2dataset"])
        print(f"download {count} images ({args.size}px -> {config.image_size}px, 16 threads, 1 process), "
              f"median of {repeats}, process start-up included:")
        print(f"  ours         {ours_s:7.2f} s  {count / ours_s:7.1f} img/s  runs {['%.2f' % t for t in times['ours']]}")
        print(f"  img2dataset  {peer_s:7.2f} s  {count / peer_s:7.1f} img/s  runs {['%.2f' % t for t in times['img2dataset']]}")
        print(f"  throughput ratio ours/img2dataset = {peer_s / ours_s:.2f}x (target >= 0.9x)")

        catalog = tmp / "catalog.json"
        catalog.write_text(json.dumps([{"id": i, "url": r["url"], "caption": r["caption"]} for i, r in enumerate(rows)]))
        with serve("knn_service.py", str(catalog)) as knn:
            e2e = config.replace(out_dir=str(tmp / "e2e"), knn_url=knn, indice_name="test_index",
                                 prompts=["modern room"], num_images=count, module="canny")
            start = time.perf_counter()
            manifest = run_build(e2e)
            total = time.perf_counter() - start
        written = manifest["counts"]["written"]
        print(f"end to end (knn retrieve, download, source captions, canny, write): {written} images in {total:.2f} s "
              f"= {written / total:.1f} img/s")
        for stage, seconds in manifest["timings_seconds"].items():
            print(f"  {stage:10s} {seconds:7.2f} s  {100 * seconds / total:5.1f}%")
    return 0


if __name__ == "__main__":
    sys.exit(main())
