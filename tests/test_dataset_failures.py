"""Builds that cannot work must fail, say why, and leave nothing marked done that a rerun should redo."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent


def photos(folder: Path, count: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        pixels = np.zeros((24, 24, 3), np.uint8)
        pixels[4:20, 4:20] = (40 * i + 60, 90, 200)
        Image.fromarray(pixels).save(folder / f"p{i}.png")
    return folder


def cli_build(out: Path, images: Path, module: str, annotators: Path):
    return subprocess.run(
        [sys.executable, "-m", "lib_controlnet", "dataset", "build", "--out", str(out), "--image-dir", str(images),
         "--module", module, "--image-size", "16", "--annotator-dir", str(annotators), "--quiet"],
        capture_output=True, text=True, cwd=ROOT, timeout=300)


def test_missing_weights_stop_the_build_before_download_and_a_rerun_with_them_builds(tmp_path):
    images, out, annotators = photos(tmp_path / "photos", 3), tmp_path / "out", tmp_path / "annotators"
    annotators.mkdir()
    first = cli_build(out, images, "softedge_pidinet", annotators)
    assert first.returncode == 2, first.stdout + first.stderr
    message = first.stderr.strip()
    assert message.count("\n") == 0 and "table5_pidinet.pth" in message and "Traceback" not in message
    assert not (out / ".build" / "download").exists() and not (out / "manifest.json").exists()

    from annotators import random_weights

    random_weights.write(annotators, ["table5_pidinet.pth"])
    # the rerun, in this process to spare a second interpreter start (the CLI path was driven above)
    from lib_controlnet.dataset.config import BuildConfig
    from lib_controlnet.dataset.job import run_build
    from lib_controlnet.settings import get_settings, update_settings

    before = get_settings().annotator_models_path
    update_settings(annotator_models_path=annotators)
    try:
        run_build(BuildConfig(out_dir=str(out), image_dir=str(images), image_size=16, module="softedge_pidinet"))
    finally:
        update_settings(annotator_models_path=before)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["counts"]["written"] == 3
    import pyarrow.parquet as pq

    assert sum(pq.ParquetFile(p).metadata.num_rows for p in (out / "data").glob("train-*.parquet")) == 3


def test_depth_midas_without_weights_is_refused_with_its_sentence(tmp_path):
    from lib_controlnet.dataset.config import BuildConfig
    from lib_controlnet.dataset.job import run_build
    from lib_controlnet.errors import UserError
    from lib_controlnet.settings import get_settings, update_settings

    before = get_settings().annotator_models_path
    update_settings(annotator_models_path=tmp_path / "empty")
    try:
        with pytest.raises(UserError, match="dpt_hybrid-midas-501f0c75.pt"):
            run_build(BuildConfig(out_dir=str(tmp_path / "out"), image_dir=str(photos(tmp_path / "p", 1)),
                                  image_size=16, module="depth_midas"))
    finally:
        update_settings(annotator_models_path=before)
    assert not (tmp_path / "out" / ".build" / "download").exists()


def test_a_stage_that_loses_every_sample_fails_and_a_rerun_redoes_it(tmp_path):
    from lib_controlnet.dataset.config import BuildConfig
    from lib_controlnet.dataset.job import StageFailed, run_build

    images = tmp_path / "photos"
    images.mkdir()
    for i in range(2):  # files still being copied: truncated
        (images / f"p{i}.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    config = BuildConfig(out_dir=str(tmp_path / "out"), image_dir=str(images), image_size=16, module="canny")
    with pytest.raises(StageFailed, match="download stage kept none"):
        run_build(config)
    out = tmp_path / "out"
    assert not (out / "manifest.json").exists() and not (out / ".build" / "download" / "done.json").exists()
    assert len((out / "failures.jsonl").read_text().splitlines()) == 2
    photos(images, 2)  # the copy finished: same names, readable now
    manifest = run_build(config)
    assert manifest["counts"]["written"] == 2 and manifest["counts"]["failed"] == 0


def test_a_module_resolution_out_of_the_registry_range_is_refused_before_any_work(tmp_path):
    from lib_controlnet.dataset.config import BuildConfig, ConfigError

    with pytest.raises(ConfigError, match="module_resolution must be -1 .* from 64 to 2048, got 16"):
        BuildConfig(out_dir=str(tmp_path), image_dir=str(tmp_path), module_resolution=16).validated()
    # a small image size is no resolution the user asked for: maps are made at the smallest one and fitted
    from lib_controlnet.dataset.condition import map_resolution

    assert map_resolution(BuildConfig(image_size=16)) == 64
