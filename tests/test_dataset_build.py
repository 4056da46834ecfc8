"""Dataset builds against real loopback servers: a clip-retrieval-protocol knn service and a troublesome image
host. One reference build (in-process), then a chain of CLI runs each SIGKILLed in the middle of a stage, whose
final output must equal the reference."""
from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from servers import serve
from servers.tiny_blip import save_tiny_blip

ROOT = Path(__file__).resolve().parent.parent
GOOD = [f"/good/{i}.{'png' if i % 3 == 0 else 'jpg'}" for i in range(8)]
BAD = {  # path -> words the failure reason must contain
    "/missing.png": "404",
    "/slow.jpg": "timed out",
    "/corrupt.jpg": "decoding",
    "/page.html": "decoding",
    "/bomb.png": "pixels",
    "/big.jpg": "larger than",
    "/noai.jpg": "x-robots-tag",
}
REFUSED = {"ftp://127.0.0.1/a.jpg": "scheme", "file:///etc/passwd": "scheme"}


def catalog(base: str) -> list[dict]:
    rows = [{"id": i, "url": base + path, "caption": f"modern room number {i}"} for i, path in enumerate(GOOD)]
    rows.append({"id": 50, "url": f"{base}/redirect/50", "caption": "rustic room redirect"})
    rows += [{"id": 100 + i, "url": base + path, "caption": f"rustic room {path}"} for i, path in enumerate(BAD)]
    rows += [{"id": 200 + i, "url": url, "caption": "rustic room refused"} for i, url in enumerate(REFUSED)]
    rows.append({"id": 3, "url": f"{base}/good/3.jpg?same-id", "caption": "modern room duplicate id"})  # dedup by id
    return rows


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dataset")
    with serve("image_host.py", "--slow-seconds", "3") as host:
        cat = tmp / "catalog.json"
        cat.write_text(json.dumps(catalog(host)))
        with serve("knn_service.py", str(cat), "--log", str(tmp / "knn.jsonl"), "--delay", "0.4") as knn:
            yield {"tmp": tmp, "host": host, "knn": knn, "blip": save_tiny_blip(tmp / "blip")}


def options(env, out: Path) -> dict:
    return {
        "out_dir": str(out), "knn_url": env["knn"], "indice_name": "test_index", "template": "{style} room",
        "template_values": {"style": ["modern", "rustic"]}, "num_images": 50, "aesthetic_score": 9,
        "image_size": 64, "timeout": 1.5, "retries": 0, "thread_count": 4, "samples_per_shard": 2,
        "allow_private_urls": True, "max_image_bytes": 1024 * 1024, "max_image_pixels": 16_000_000,
        "caption_mode": "both", "captioner_path": str(env["blip"]), "caption_batch_size": 1,
        "caption_max_tokens": 6, "module": "canny", "preview_count": 3,
    }


@pytest.fixture(scope="module")
def reference(env):
    from lib_controlnet.dataset.config import BuildConfig
    from lib_controlnet.dataset.job import run_build

    out = env["tmp"] / "reference"
    events = []
    manifest = run_build(BuildConfig.from_dict(options(env, out)), progress=events.append)
    return {"out": out, "manifest": manifest, "events": events}


def rows_of(out: Path) -> list[tuple]:
    import pyarrow.parquet as pq

    rows = []
    for path in sorted((out / "data").glob("train-*.parquet")):
        for r in pq.read_table(path).to_pylist():
            rows.append((r["key"], r["url"], hashlib.sha1(r["image"]["bytes"]).hexdigest(),
                         hashlib.sha1(r["conditioning_image"]["bytes"]).hexdigest(), r["text"], r["generated_caption"]))
    return rows


def test_build_keeps_every_good_image_and_logs_every_bad_one(env, reference):
    out = reference["out"]
    urls = [row[1] for row in rows_of(out)]
    expected = [env["host"] + path for path in GOOD] + [f"{env['host']}/redirect/50"]
    assert sorted(urls) == sorted(expected)
    assert len(set(urls)) == len(urls)
    failures = [json.loads(line) for line in (out / "failures.jsonl").read_text().splitlines()]
    by_url = {f["url"]: f for f in failures}
    for path, words in BAD.items():
        assert words in by_url[env["host"] + path]["reason"].lower(), by_url[env["host"] + path]
    for url, words in REFUSED.items():
        assert words in by_url[url]["reason"]
    assert len(failures) == len(BAD) + len(REFUSED)
    counts = reference["manifest"]["counts"]
    assert counts["written"] == len(expected) and counts["failed"] == len(failures)
    assert set(reference["manifest"]["timings_seconds"]) == {"retrieve", "download", "caption", "condition", "write"}
    stages = {e.stage for e in reference["events"]}
    assert stages == {"retrieve", "download", "caption", "condition", "write"}
    assert len(list((out / "preview").glob("*_conditioning.png"))) == 3


def test_knn_requests_follow_the_clip_retrieval_protocol(env, reference):
    sent = [json.loads(line) for line in (env["tmp"] / "knn.jsonl").read_text().splitlines()]
    first = sent[0]
    assert first["text"] == "modern room" and first["indice_name"] == "test_index"
    assert first["modality"] == "image" and first["num_images"] == 50 and first["aesthetic_score"] == "9"
    for field in ("deduplicate", "use_safety_model", "use_violence_detector", "use_mclip", "aesthetic_weight"):
        assert field in first


def test_output_loads_with_datasets_and_both_columns_decode(reference):
    import datasets
    from PIL import Image

    ds = datasets.load_dataset(str(reference["out"]), split="train")
    assert ds.num_rows == reference["manifest"]["counts"]["written"]
    row = ds[0]
    assert isinstance(row["image"], Image.Image) and isinstance(row["conditioning_image"], Image.Image)
    assert row["image"].size == row["conditioning_image"].size == (64, 64)
    assert isinstance(row["text"], str) and row["text"].startswith("modern room")
    assert row["generated_caption"]  # caption_mode both: a column each
    # what diffusers' train_controlnet.py does with --train_data_dir
    dd = datasets.load_dataset(str(reference["out"]))
    assert {"image", "conditioning_image", "text"} <= set(dd["train"].column_names)


def test_dataset_info_cli(reference):
    result = subprocess.run([sys.executable, "-m", "lib_controlnet", "dataset", "info", str(reference["out"]), "--json"],
                            capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)
    assert info["complete"] and info["rows"] == reference["manifest"]["counts"]["written"]
    assert info["failures_by_stage"]["download"] >= 4


LINE = re.compile(r"\[\d/5 (\w+)\] (\d+)/(\d+)")


def run_and_kill_in(stage: str, config: Path) -> tuple[int, list[str]]:
    """Run the CLI build; SIGKILL it as soon as it reports progress inside `stage`."""
    process = subprocess.Popen([sys.executable, "-m", "lib_controlnet", "dataset", "build", "--config", str(config)],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT)
    lines = []
    for line in process.stdout:
        lines.append(line.rstrip())
        match = LINE.search(line)
        if match and match[1] == stage and 0 < int(match[2]) < int(match[3]):
            process.send_signal(signal.SIGKILL)
            break
    process.stdout.close()
    return process.wait(timeout=300), lines


def test_sigkill_in_every_stage_then_resume_equals_uninterrupted_build(env, reference):
    out = env["tmp"] / "killed"
    config = env["tmp"] / "killed.yaml"
    import yaml

    config.write_text(yaml.safe_dump(options(env, out)))
    for stage in ("retrieve", "download", "caption", "condition", "write"):
        code, lines = run_and_kill_in(stage, config)
        assert code == -signal.SIGKILL, f"{stage}: run was not killed mid-stage\n" + "\n".join(lines[-5:])
    code, lines = run_and_kill_in("never", config)
    assert code == 0, "\n".join(lines[-10:])
    assert rows_of(out) == rows_of(reference["out"])
    failures = lambda d: sorted((d / "failures.jsonl").read_text().splitlines())  # noqa: E731
    assert failures(out) == failures(reference["out"])
    # nothing of the killed runs is left running: the folder lock is free
    from lib_controlnet.dataset.config import BuildConfig
    from lib_controlnet.dataset.job import run_build

    assert run_build(BuildConfig.from_dict(options(env, out)))["counts"]["written"] == len(rows_of(out))
