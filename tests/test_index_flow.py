"""A local CLIP index driven as a user drives it (the CLI's entry point; `serve` in its own process): a folder of
images -> `dataset index build` -> `dataset index query` -> `dataset build --knn-url INDEX` (download,
conditioning maps, parquet dataset), all offline with a tiny open_clip model (random weights, written as a
config .json + weights file); then `dataset index serve` answering exactly what clip-retrieval's ClipClient
sends; then bad input, one sentence each."""
from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tiny_clip import write_tiny_clip

ROOT = Path(__file__).resolve().parent.parent
COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220), "yellow": (230, 220, 30)}


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """Images (a coloured square on a coloured ground, caption beside), the tiny model, the index (CLI)."""
    from PIL import Image, ImageDraw

    root = tmp_path_factory.mktemp("index_flow")
    images = root / "photos"
    images.mkdir()
    names = list(COLOURS)
    for i in range(12):
        ground, square = names[i % 4], names[(i // 4 + 1 + i % 4) % 4]
        image = Image.new("RGB", (96, 80), COLOURS[ground])
        ImageDraw.Draw(image).rectangle([20 + i, 15, 60 + i, 55], fill=COLOURS[square])
        image.save(images / f"{i:02d}.png")
        (images / f"{i:02d}.txt").write_text(f"a {square} square on {ground}", "utf-8")
    (images / "broken.jpg").write_bytes(b"not an image")  # left out of the index, counted
    config, weights = write_tiny_clip(root / "model")
    index = root / "index"
    from lib_controlnet.cli import main  # `python -m lib_controlnet`'s entry point, in this process

    assert main([str(a) for a in ("dataset", "index", "build", "--out", index, "--image-dir", images, "--clip-model",
                                  config, "--clip-weights", weights, "--shard-size", 8, "--max-index-memory", "100M",
                                  "--current-memory", "1G")]) == 0
    return {"root": root, "images": images, "index": index, "config": config, "weights": weights}


def test_build_query_and_dataset_from_a_local_index(built, capsys):
    import pyarrow.parquet as pq

    from lib_controlnet.cli import main  # the same entry point as `python -m lib_controlnet`, in this process

    index = built["index"]
    # clip-retrieval's layout, shards named so text order is shard order
    for name in ("image.index", "text.index", "index_info.json", "metadata/metadata_00000.parquet",
                 "metadata/metadata_00001.parquet", "embeddings/img_emb/img_emb_00001.npy",
                 "embeddings/text_emb/text_emb_00000.npy"):
        assert (index / name).is_file(), name
    info = json.loads((index / "index_info.json").read_text())
    assert (info["count"], info["skipped_images"], info["dim"], info["text_index"]) == (12, 1, 32, True)
    meta = pq.read_table(index / "metadata" / "metadata_00001.parquet").to_pylist()
    vectors = np.load(index / "embeddings" / "img_emb" / "img_emb_00001.npy")
    assert [Path(m["image_path"]).name for m in meta] == ["08.png", "09.png", "10.png", "11.png"]
    assert vectors.shape == (4, 32)

    # an example image finds itself first, by its own CLIP vector
    assert main(["dataset", "index", "query", str(index), "--image", str(built["images"] / "09.png"), "--num", "3",
                 "--json", "--no-dedup"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(rows) == 3 and Path(rows[0]["image_path"]).name == "09.png" and rows[0]["id"] == 9
    assert rows[0]["similarity"] == pytest.approx(1.0, abs=1e-4)

    # the Dataset tab's retrieval source given the index folder: query, read the files, condition, write
    out = built["root"] / "dataset"
    assert main([str(a) for a in (
        "dataset", "build", "--out", out, "--knn-url", index, "--prompt", "a red square on blue",
        "--example-image", built["images"] / "02.png", "--num-images", 4, "--no-deduplicate",
        "--image-size", 64, "--module", "canny", "--quiet")]) == 0
    table = pq.read_table(sorted((out / "data").glob("train-*.parquet"))[0]).to_pylist()
    assert 4 <= len(table) <= 8
    assert {r["source"] for r in table} == {"local_index_file"}
    assert all(Path(r["url"]).parent == built["images"] for r in table)
    assert all(r["image"]["bytes"] and r["conditioning_image"]["bytes"] for r in table)
    assert {r["text"] for r in table} <= {p.read_text() for p in built["images"].glob("*.txt")}


def test_killed_build_resumes_from_its_shards(built, tmp_path):
    import shutil

    from lib_controlnet.dataset.index.build import IndexBuildConfig, build_local_index

    index = tmp_path / "index"
    shutil.copytree(built["index"], index)
    # what a kill during the second shard leaves: shard 0 whole, shard 1 without metadata, no index yet
    (index / "metadata" / "metadata_00001.parquet").unlink()
    (index / "image.index").unlink()
    (index / "text.index").unlink()
    (index / "index_info.json").unlink()
    first = index / "embeddings" / "img_emb" / "img_emb_00000.npy"
    os.utime(first, ns=(1, 1))
    said = []
    info = build_local_index(IndexBuildConfig(
        out_dir=str(index), image_dir=str(built["images"]), clip_model=str(built["config"]),
        clip_weights=str(built["weights"]), index_key="Flat", shard_size=8), say=said.append)
    assert first.stat().st_mtime_ns == 1  # shard 0 was kept, not embedded again
    assert (index / "metadata" / "metadata_00001.parquet").is_file() and (index / "image.index").is_file()
    assert info["count"] == 12


def test_served_index_answers_clip_client_requests(built):
    import requests

    process = subprocess.Popen([sys.executable, "-m", "lib_controlnet", "dataset", "index", "serve", built["index"],
                                "--port", "0", "--name", "my_index"], cwd=ROOT, stdout=subprocess.PIPE, text=True,
                               env=dict(os.environ, PYTHONPATH=str(ROOT)))
    try:
        line = process.stdout.readline()
        base = line.strip().rsplit(" ", 1)[-1].rsplit("/", 1)[0]
        assert base.startswith("http://127.0.0.1:"), line
        assert requests.get(base + "/indices-list", timeout=30).json() == ["my_index"]
        image = base64.b64encode((built["images"] / "05.png").read_bytes()).decode()
        # exactly what clip_retrieval.clip_client.ClipClient.query(image=...) posts: every field, nulls
        # included, as a JSON body without a content type
        body = {"text": None, "image": image, "image_url": None, "embedding_input": None, "deduplicate": False,
                "use_safety_model": True, "use_violence_detector": True, "indice_name": "my_index",
                "use_mclip": False, "aesthetic_score": 9, "aesthetic_weight": 0.5, "modality": "image",
                "num_images": 3, "num_result_ids": 3}
        results = requests.post(base + "/knn-service", data=json.dumps(body), timeout=60).json()
        assert len(results) == 3
        assert {"id", "similarity", "image_path", "caption", "image"} <= set(results[0])
        assert results[0]["id"] == 5 and Path(results[0]["image_path"]).name == "05.png"
        assert base64.b64decode(results[0]["image"])[:2] == b"\xff\xd8"  # the back's JPEG preview of image_path
        assert results[0]["similarity"] >= results[1]["similarity"] >= results[2]["similarity"]
        text = dict(body, image=None, text="a green square on red", modality="text", num_images=2,
                    num_result_ids=2)
        by_caption = requests.post(base + "/knn-service", data=json.dumps(text), timeout=60).json()
        assert len(by_caption) == 2 and all("caption" in r for r in by_caption)
        meta = requests.post(base + "/metadata", data=json.dumps({"ids": [5, 0], "indice_name": "my_index"}),
                             timeout=30).json()
        assert [m["id"] for m in meta] == [5, 0]
        assert Path(meta[0]["metadata"]["image_path"]).name == "05.png"
        wrong = requests.post(base + "/knn-service", data=json.dumps(dict(body, indice_name="laion5B")), timeout=30)
        assert wrong.status_code == 400 and "my_index" in wrong.json()["error"]
    finally:
        process.kill()
        process.wait()


def test_bad_input_gets_one_sentence(built, tmp_path, capsys):
    import shutil

    from lib_controlnet.cli import main

    def error_of(*args) -> str:
        assert main([str(a) for a in args]) == 2
        message = capsys.readouterr().err.strip()
        assert message.startswith("error: ") and "\n" not in message and "Traceback" not in message
        return message

    (tmp_path / "plain").mkdir()
    assert "is not a CLIP index folder" in error_of("dataset", "index", "query", tmp_path / "plain", "--text", "x")

    other = tmp_path / "other_model"
    shutil.copytree(built["index"], other)
    config16, weights16 = write_tiny_clip(tmp_path / "m16", name="tiny-clip-16", embed_dim=16)
    info = json.loads((other / "index_info.json").read_text())
    info.update(clip_model=str(config16), clip_weights=str(weights16))
    (other / "index_info.json").write_text(json.dumps(info))
    assert "makes 16-d vectors but index other_model holds 32-d" in error_of(
        "dataset", "index", "query", other, "--text", "x")

    corrupt = tmp_path / "corrupt"
    shutil.copytree(built["index"], corrupt)
    (corrupt / "metadata" / "metadata_00001.parquet").write_bytes(b"PAR1 torn write")
    assert "metadata_00001.parquet is not a readable parquet file" in error_of(
        "dataset", "build", "--out", tmp_path / "ds", "--knn-url", corrupt, "--prompt", "x")
