"""A dataset folder rebuilt in place (or another folder of the same name) must load its own rows through
`datasets.load_dataset(DIR)`, which is what diffusers' train_controlnet.py --train_data_dir does."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent


def photos(folder: Path, count: int, seed: int) -> Path:
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    for i in range(count):
        pixels = np.zeros((24, 24, 3), np.uint8)
        pixels[4:20, 4:20] = rng.integers(60, 255, 3)
        Image.fromarray(pixels).save(folder / f"p{i}.png")
        (folder / f"p{i}.txt").write_text(f"photo {seed}-{i}")
    return folder


def build(out: Path, images: Path) -> dict:
    from lib_controlnet.dataset.config import BuildConfig
    from lib_controlnet.dataset.job import run_build

    return run_build(BuildConfig(out_dir=str(out), image_dir=str(images), image_size=16, module="canny",
                                 samples_per_shard=4, preview_count=1))


def load_texts(folder: Path) -> list[str]:
    import datasets

    return sorted(datasets.load_dataset(str(folder), split="train")["text"])


@pytest.fixture(scope="module")
def first_build(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("rebuild")
    out = tmp / "a" / "interiors"
    build(out, photos(tmp / "six", 6, seed=1))
    return tmp, out


def test_rebuilt_folder_loads_its_new_rows(first_build):
    tmp, out = first_build
    assert load_texts(out) == [f"photo 1-{i}" for i in range(6)]
    shutil.rmtree(out)
    build(out, photos(tmp / "two", 2, seed=2))
    assert load_texts(out) == ["photo 2-0", "photo 2-1"]
    # a folder of the same name elsewhere, with other rows, is another dataset too
    other = tmp / "b" / "interiors"
    build(other, photos(tmp / "three", 3, seed=3))
    assert load_texts(other) == ["photo 3-0", "photo 3-1", "photo 3-2"]
    assert load_texts(out) == ["photo 2-0", "photo 2-1"]  # and the same content still loads


def test_the_suite_writes_no_user_cache():
    import datasets.config

    session = Path(os.environ["HF_HOME"])
    assert Path(datasets.config.HF_DATASETS_CACHE).is_relative_to(session)
    for name in ("HF_DATASETS_CACHE", "TORCH_HOME", "XDG_CACHE_HOME", "HF_HUB_CACHE"):
        assert Path(os.environ[name]).is_relative_to(session.parent), name
    assert not Path(datasets.config.HF_DATASETS_CACHE).is_relative_to(Path.home())


def test_dataset_info_into_a_closed_pipe_ends_quietly(first_build):
    """`dataset info DS | head -2`: the reader leaves first; no traceback."""
    _, out = first_build
    read, write = os.pipe()
    os.close(read)  # the reader has already gone, as `head` has after its lines
    try:
        result = subprocess.run([sys.executable, "-m", "lib_controlnet", "dataset", "info", str(out)], stdout=write,
                                stderr=subprocess.PIPE, text=True, cwd=ROOT, timeout=120)
    finally:
        os.close(write)
    assert "Traceback" not in result.stderr and "BrokenPipeError" not in result.stderr, result.stderr
    assert result.returncode == 141
