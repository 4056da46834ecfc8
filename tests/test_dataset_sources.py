"""Dataset sources, config, URL guard and the local (no download) path of the job: cancel, resume, HF on disk,
the UI runner and the Dataset tab. No img2dataset process here, so these stay fast."""
from __future__ import annotations

import io
import json
import threading
import urllib.error

import numpy as np
import pytest
from PIL import Image

from servers import serve


@pytest.fixture(scope="module")
def host():
    with serve("image_host.py", "--slow-seconds", "1") as base:
        yield base


# ---- URL guard (safety.py) ----

def test_guard_allows_and_refuses_loopback(host):
    from lib_controlnet.dataset.safety import FetchPolicy, RefusedURL, build_opener, check_scheme, check_url

    allowed = build_opener(FetchPolicy(allow_private=True))
    assert allowed.open(f"{host}/good/1.png", timeout=5).read()[:4] == b"\x89PNG"
    assert allowed.open(f"{host}/redirect/2", timeout=5).read()[:4] == b"\x89PNG"
    refused = build_opener(FetchPolicy(allow_private=False))
    for url in (f"{host}/good/1.png", f"{host.replace('127.0.0.1', 'localhost')}/good/1.png"):
        with pytest.raises(urllib.error.URLError, match="private address"):
            refused.open(url, timeout=5)
    policy = FetchPolicy(allow_private=False)
    assert "private address" in check_url(f"{host}/x.jpg", policy)
    assert "private address" in check_url("http://localhost:1/x.jpg", policy)
    assert "private address" in check_scheme("http://169.254.169.254/latest/meta-data", policy)
    assert check_scheme("http://example.com/a.jpg", policy) is None
    assert "scheme" in check_scheme("file:///etc/passwd", policy)
    assert "scheme" in check_scheme("ftp://example.com/a.jpg", policy)
    with pytest.raises(urllib.error.URLError):  # no file: handler at all in the guarded opener
        allowed.open("file:///etc/passwd")
    capped = build_opener(FetchPolicy(allow_private=True, max_bytes=1024 * 1024))
    with pytest.raises(RefusedURL, match="larger than"):
        capped.open(f"{host}/big.jpg", timeout=5)
    with pytest.raises(urllib.error.HTTPError):
        allowed.open(f"{host}/missing.png", timeout=5)


# ---- config ----

def test_config_from_yaml_json_and_flags(tmp_path):
    import argparse

    from lib_controlnet.dataset.config import BuildConfig, ConfigError, add_cli_arguments, config_from_args

    (tmp_path / "c.yaml").write_text("out_dir: /tmp/x\nprompts: [a cat]\nimage_size: 256\nknn_url: http://h:1\n")
    (tmp_path / "c.json").write_text(json.dumps({"out_dir": "/tmp/y", "url_list": "u.csv"}))
    assert BuildConfig.from_file(tmp_path / "c.yaml").image_size == 256
    assert BuildConfig.from_file(tmp_path / "c.json").url_list == "u.csv"
    (tmp_path / "bad.yaml").write_text("imagesize: 3\n")
    with pytest.raises(ConfigError, match="imagesize"):
        BuildConfig.from_file(tmp_path / "bad.yaml")
    with pytest.raises(ConfigError, match="captioner_path"):
        BuildConfig(caption_mode="blip").validated()
    parser = argparse.ArgumentParser()
    parser.add_argument("--config")
    add_cli_arguments(parser)
    args = parser.parse_args(["--config", str(tmp_path / "c.yaml"), "--prompt", "b", "--prompt", "c",
                              "--image-size", "128", "--allow-private-urls", "--no-deduplicate"])
    config = config_from_args(args)
    assert config.prompts == ["b", "c"] and config.image_size == 128 and config.out_dir == "/tmp/x"
    assert config.allow_private_urls and not config.deduplicate and config.knn_url == "http://h:1"
    with pytest.raises(ConfigError, match="source"):
        BuildConfig(out_dir="/tmp/z").require_runnable()


# ---- sources ----

def test_template_expansion_and_queries():
    from lib_controlnet.dataset.sources.knn import expand_template, service_url
    from lib_controlnet.errors import UserError

    assert expand_template("{style} {room}, interior design", {"style": ["modern", "rustic"], "room": ["kitchen"]}) == [
        "modern kitchen, interior design", "rustic kitchen, interior design"]
    with pytest.raises(UserError, match="room"):
        expand_template("{style} {room}", {"style": ["a"]})
    assert service_url("http://h:1/") == "http://h:1/knn-service"
    assert service_url("http://h:1/knn-service") == "http://h:1/knn-service"


def test_knn_service_errors_are_one_sentence(tmp_path):
    from lib_controlnet.dataset.config import BuildConfig
    from lib_controlnet.dataset.sources.knn import KnnServiceError, retrieve

    (tmp_path / "cat.json").write_text("[]")
    with serve("knn_service.py", str(tmp_path / "cat.json")) as knn:
        with pytest.raises(KnnServiceError, match="unknown index"):
            retrieve(BuildConfig(knn_url=knn, prompts=["x"], indice_name="nope"))
    with pytest.raises(KnnServiceError, match="Cannot reach"):
        retrieve(BuildConfig(knn_url="http://127.0.0.1:9", prompts=["x"], knn_timeout=2))


@pytest.mark.parametrize("suffix", ["csv", "jsonl", "parquet"])
def test_url_list_formats_columns_and_keyword_filters(tmp_path, suffix):
    import pyarrow as pa
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    from lib_controlnet.dataset.config import BuildConfig
    from lib_controlnet.dataset.sources.url_list import UrlListError, read_url_list

    rows = [{"URL": "http://a/1.jpg", "TEXT": "A modern kitchen"}, {"URL": "http://a/2.jpg", "TEXT": "a dog"},
            {"URL": "http://a/1.jpg", "TEXT": "A modern kitchen"}, {"URL": "http://a/3.jpg", "TEXT": "modern watermark"}]
    path = tmp_path / f"list.{suffix}"
    table = pa.Table.from_pylist(rows)
    if suffix == "csv":
        pacsv.write_csv(table, path)
    elif suffix == "parquet":
        pq.write_table(table, path)
    else:
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = BuildConfig(url_list=str(path), url_col="URL", caption_col="TEXT", include_keywords=["modern"],
                         exclude_keywords=["watermark"])
    got = read_url_list(config)
    assert [(r["url"], r["caption"]) for r in got] == [("http://a/1.jpg", "A modern kitchen")]
    with pytest.raises(UrlListError, match="no 'url' column"):
        read_url_list(BuildConfig(url_list=str(path)))


# ---- local builds: cancel, resume, HF on disk, runner, tab ----

def make_images(folder, count):
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(count):
        pixels = np.zeros((40 + i, 48, 3), np.uint8)
        pixels[10:30, 10:30] = rng.integers(60, 255, 3)
        Image.fromarray(pixels).save(folder / f"img{i}.png")
        if i % 2 == 0:
            (folder / f"img{i}.txt").write_text(f"caption {i}")
    (folder / "broken.png").write_bytes(b"not a png")
    return folder


def table_rows(out):
    import pyarrow.parquet as pq

    return [(r["url"], r["image"]["bytes"], r["conditioning_image"]["bytes"], r["text"])
            for p in sorted((out / "data").glob("train-*.parquet")) for r in pq.read_table(p).to_pylist()]


def test_local_folder_cancel_then_resume_equals_uninterrupted(tmp_path):
    from lib_controlnet.dataset.config import BuildConfig
    from lib_controlnet.dataset.download import Cancelled
    from lib_controlnet.dataset.job import run_build

    images = make_images(tmp_path / "images", 7)
    options = {"image_dir": str(images), "image_size": 32, "samples_per_shard": 2, "module": "canny"}
    whole = run_build(BuildConfig(out_dir=str(tmp_path / "whole"), **options))
    assert whole["counts"]["written"] == 7
    cancel = threading.Event()

    def progress(p):
        if p.stage == "condition" and p.done > 0:
            cancel.set()

    with pytest.raises(Cancelled):
        run_build(BuildConfig(out_dir=str(tmp_path / "resumed"), **options), progress=progress, cancel=cancel)
    assert not (tmp_path / "resumed" / "manifest.json").exists()
    run_build(BuildConfig(out_dir=str(tmp_path / "resumed"), **options))
    assert table_rows(tmp_path / "resumed") == table_rows(tmp_path / "whole")
    texts = {r[0].rsplit("/", 1)[1]: r[3] for r in table_rows(tmp_path / "whole")}
    assert texts["img0.png"] == "caption 0" and texts["img1.png"] == ""
    failures = (tmp_path / "whole" / "failures.jsonl").read_text()
    assert "broken.png" in failures and "resize" in failures
    from lib_controlnet.dataset.config import ConfigError

    with pytest.raises(ConfigError, match="other options"):
        run_build(BuildConfig(out_dir=str(tmp_path / "whole"), **{**options, "module": "invert"}))


def test_hf_disk_source_and_background_runner(tmp_path):
    import datasets

    from lib_controlnet.dataset.config import BuildConfig
    from lib_controlnet.dataset.runner import BackgroundBuild

    def png(i):
        buffer = io.BytesIO()
        Image.fromarray(np.full((30, 30, 3), 40 * i, np.uint8)).save(buffer, "PNG")
        return buffer.getvalue()

    ds = datasets.Dataset.from_dict({"image": [{"bytes": png(i), "path": None} for i in range(3)],
                                     "text": [f"t{i}" for i in range(3)]},
                                    features=datasets.Features({"image": datasets.Image(), "text": datasets.Value("string")}))
    ds.save_to_disk(str(tmp_path / "hf"))
    runner = BackgroundBuild()
    runner.start(BuildConfig(out_dir=str(tmp_path / "out"), hf_dataset_dir=str(tmp_path / "hf"), image_size=16))
    assert runner.wait(120)
    assert runner.error is None, runner.error
    assert "done: 3 samples" in runner.status_text()
    loaded = datasets.load_dataset(str(tmp_path / "out"), split="train")
    assert loaded["text"] == ["t0", "t1", "t2"] and loaded[0]["conditioning_image"].size == (16, 16)


def test_dataset_tab_builds_and_runs(tmp_path):
    import gradio as gr

    from lib_controlnet.ui.dataset_tab import FIELDS, build_dataset_tab

    images = make_images(tmp_path / "images", 2)
    with gr.Blocks() as demo:
        tab = build_dataset_tab()
    assert demo is not None and set(FIELDS) == set(tab["components"])
    values = {name: getattr(tab["components"][name], "value", None) for name in FIELDS}
    values.update(out_dir=str(tmp_path / "ui-out"), image_dir=str(images), image_size=32)
    updates = list(tab["on_build"](*[values[name] for name in FIELDS]))
    text, gallery = updates[-1]
    assert "done: 2 samples" in text and len(gallery) == 4
    assert tab["on_refresh"]("")[0] == text
    values.update(image_dir="", out_dir=str(tmp_path / "none"))
    text, _ = list(tab["on_build"](*[values[name] for name in FIELDS]))[-1]
    assert text.startswith("error:") and "source" in text


def test_knn_example_images_and_merge_by_url_and_id(tmp_path):
    import base64

    from lib_controlnet.dataset.config import BuildConfig
    from lib_controlnet.dataset.sources.knn import retrieve

    catalog = [{"id": 1, "url": "http://x/1.jpg", "caption": "a red chair"},
               {"id": 2, "url": "http://x/2.jpg", "caption": "a blue chair"},
               {"id": 1, "url": "http://x/1-copy.jpg", "caption": "a red chair again"},
               {"id": 3, "url": "http://x/2.jpg", "caption": "same url, other id"}]
    (tmp_path / "cat.json").write_text(json.dumps(catalog))
    example = tmp_path / "example.png"
    Image.new("RGB", (8, 8), "red").save(example)
    log = tmp_path / "log.jsonl"
    with serve("knn_service.py", str(tmp_path / "cat.json"), "--log", str(log)) as knn:
        got = retrieve(BuildConfig(knn_url=knn, indice_name="test_index", prompts=["red chair", "blue chair"],
                                   example_images=[str(example), "http://x/query.jpg"], modality="text"))
    assert [r["url"] for r in got] == ["http://x/1.jpg", "http://x/2.jpg"]
    sent = [json.loads(line) for line in log.read_text().splitlines()]
    assert [s.get("text") for s in sent[:2]] == ["red chair", "blue chair"]
    assert base64.b64decode(sent[2]["image"]) == example.read_bytes() and sent[3]["image_url"] == "http://x/query.jpg"
    assert all(s["modality"] == "text" for s in sent)


def test_cli_errors_are_one_line(tmp_path):
    import subprocess
    import sys

    from servers.image_host import png_bomb

    images = make_images(tmp_path / "images", 1)
    (images / "bomb.png").write_bytes(png_bomb(3000))
    result = subprocess.run([sys.executable, "-m", "lib_controlnet", "dataset", "build", "--out", str(tmp_path / "o")],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and "source" in result.stderr
    result = subprocess.run([sys.executable, "-m", "lib_controlnet", "dataset", "build", "--out", str(tmp_path / "o2"),
                             "--image-dir", str(images), "--image-size", "16", "--max-image-pixels", "1000000",
                             "--quiet"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "wrote 1 samples" in result.stdout
    failures = (tmp_path / "o2" / "failures.jsonl").read_text()
    assert "bomb.png" in failures and "decompression bomb" in failures
