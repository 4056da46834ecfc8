"""Download stage: remote URLs through img2dataset (in engine.py's child process), local files and
Hugging Face rows through img2dataset's own Resizer, so every image is resized and encoded the same way.

Output, under the work folder: `download/remote/NNNNN.parquet` (img2dataset's parquet output, one file per
shard plus `NNNNN_stats.json` when the shard is complete) and `download/local/NNNNN.parquet` (same columns).
Both are resumable per shard: img2dataset's incremental mode skips shards with stats; local shards are
written atomically and skipped when present.
"""
from __future__ import annotations

import dataclasses
import io
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Optional

from lib_controlnet.dataset.files import atomic_write_json, atomic_write_jsonl, atomic_write_table
from lib_controlnet.dataset.safety import FetchPolicy, policy_for
from lib_controlnet.errors import UserError

EXTRA_COLUMNS = ["similarity", "source_id", "query", "source"]
SHARD_DIGITS = 5  # img2dataset's oom_shard_count default


class DownloadError(UserError):
    """img2dataset stopped before every shard was downloaded."""


class Cancelled(UserError):
    """The user cancelled the build; what was finished is kept and a new run resumes."""


def resizer_for(config):
    from img2dataset.resizer import Resizer

    return Resizer(
        image_size=config.image_size,
        resize_mode=config.resize_mode,
        resize_only_if_bigger=config.resize_only_if_bigger,
        encode_quality=config.encode_quality,
        encode_format=config.encode_format,
        min_image_size=config.min_image_size,
        max_image_area=config.max_image_pixels,
        max_aspect_ratio=config.aspect_limit,
    )


def img2dataset_arguments(config, url_list: Path, output_folder: Path) -> dict:
    """Our BuildConfig in img2dataset.download's terms (also what the benchmark hands img2dataset alone)."""
    return {
        "url_list": str(url_list),
        "output_folder": str(output_folder),
        "input_format": "parquet",
        "output_format": "parquet",
        "url_col": "url",
        "caption_col": "caption",
        "save_additional_columns": list(EXTRA_COLUMNS),
        "image_size": config.image_size,
        "resize_mode": config.resize_mode,
        "resize_only_if_bigger": config.resize_only_if_bigger,
        "encode_format": config.encode_format,
        "encode_quality": config.encode_quality,
        "min_image_size": config.min_image_size,
        "max_image_area": float(config.max_image_pixels),
        "max_aspect_ratio": config.aspect_limit,
        "processes_count": config.processes_count,
        "thread_count": config.thread_count,
        "number_sample_per_shard": config.samples_per_shard,
        "timeout": config.timeout,
        "retries": config.retries,
        "distributor": config.distributor,
        "incremental_mode": "incremental",
        "extract_exif": False,
        "enable_wandb": False,
        "compute_hash": "sha256",
        "user_agent_token": config.user_agent_token,
        "disallowed_header_directives": list(config.disallowed_header_directives),
    }


def shard_count(rows: int, per_shard: int) -> int:
    return math.ceil(rows / per_shard) if rows else 0


def done_remote_shards(folder: Path) -> set[int]:
    return {int(p.name.split("_")[0]) for p in folder.glob("*_stats.json")}


def run_img2dataset(config, url_list: Path, output_folder: Path, total: int,
                    on_progress: Callable[[int, int], None], cancel, log_path: Path, hold_fds: tuple = ()) -> None:
    """img2dataset in its own process group; raises Cancelled or DownloadError. `hold_fds` (the build lock)
    are inherited, so the folder stays locked until the child is gone too."""
    policy: FetchPolicy = policy_for(config)
    shards = shard_count(total, config.samples_per_shard)
    if shards == 0 or len(done_remote_shards(output_folder)) >= shards:
        return
    params = {
        "parent_pid": os.getpid(),
        "policy": dataclasses.asdict(policy),
        "download": img2dataset_arguments(config, url_list, output_folder),
    }
    params_path = atomic_write_json(output_folder.parent / "img2dataset_params.json", params)
    env = dict(os.environ, NO_ALBUMENTATIONS_UPDATE="1", OPENCV_IO_MAX_IMAGE_PIXELS=str(policy.max_pixels))
    with open(log_path, "ab") as log:
        child = subprocess.Popen(
            [sys.executable, str(Path(__file__).with_name("engine.py")), str(params_path)],
            stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True,
            pass_fds=tuple(fd for fd in hold_fds if fd >= 0),
        )
        try:
            while child.poll() is None:
                if cancel is not None and cancel.is_set():
                    raise Cancelled("Build cancelled; run it again to resume.")
                on_progress(len(done_remote_shards(output_folder)) * config.samples_per_shard, total)
                time.sleep(0.25)
        finally:
            if child.poll() is None:
                os.killpg(child.pid, signal.SIGKILL)
                child.wait()
    missing = shards - len(done_remote_shards(output_folder))
    if child.returncode != 0 or missing:
        tail = log_path.read_text("utf-8", errors="replace")[-600:].strip().splitlines()[-3:]
        raise DownloadError(
            f"img2dataset stopped with {missing} of {shards} shard(s) unfinished (exit {child.returncode}); "
            f"run the build again to retry them. Last log lines: {' | '.join(tail)}"
        )


def read_local_bytes(url: str, config, cache: dict) -> bytes:
    from lib_controlnet.dataset.sources import hf_disk

    if url.startswith(hf_disk.PREFIX):
        return hf_disk.image_bytes(url, config.hf_image_col, cache)
    return Path(url).read_bytes()


def _too_many_pixels(data: bytes, limit: int) -> Optional[str]:
    """Read only the header: the size is known before anything is decoded (decompression bomb guard)."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size
    except Exception:  # not an image Pillow knows; the resizer will say so
        return None
    if width * height > limit:
        return f"image has {width}x{height} pixels, more than max_image_pixels allows (decompression bomb guard)"
    return None


def download_local_shard(rows: list[dict], shard: int, config, out_path: Path) -> None:
    """Resize one shard of local/HF images with img2dataset's Resizer and write it like img2dataset would."""
    import pyarrow as pa

    resizer = resizer_for(config)
    oom = max(1, math.ceil(math.log10(config.samples_per_shard)))
    records, cache = [], {}
    for index, row in enumerate(rows):
        record = {**{k: row[k] for k in ("url", "caption", *EXTRA_COLUMNS)},
                  "key": f"l{shard:0{SHARD_DIGITS}d}{index:0{oom}d}", "status": "success", "error_message": None,
                  "width": None, "height": None, config.encode_format: None}
        try:
            data = read_local_bytes(row["url"], config, cache)
            if len(data) > config.max_image_bytes:
                raise ValueError(f"image larger than {config.max_image_bytes} bytes")
            too_big = _too_many_pixels(data, config.max_image_pixels)
            if too_big:
                raise ValueError(too_big)
            image, width, height, _, _, error = resizer(io.BytesIO(data))
        except Exception as failure:  # one unreadable file is a logged failure, never the end of the build
            image, width, height, error = None, None, None, f"cannot read: {failure}"
        if error is not None:
            record.update(status="failed_to_resize", error_message=error)
        else:
            record.update(width=width, height=height, **{config.encode_format: image})
        records.append(record)
    atomic_write_table(out_path, pa.Table.from_pylist(records))


def split_candidates(candidates: list[dict], policy: FetchPolicy):
    """-> (remote rows for img2dataset, local rows, refused failures). Scheme is checked here; private
    addresses are checked on connect by the guard, after DNS, redirects included."""
    from lib_controlnet.dataset.safety import check_scheme
    from lib_controlnet.dataset.sources import LOCAL_FILE_SOURCES, hf_disk

    remote, local, refused = [], [], []
    for row in candidates:
        url = row["url"]
        if url.startswith(hf_disk.PREFIX) or row["source"] in LOCAL_FILE_SOURCES:
            local.append(row)
            continue
        reason = check_scheme(url, policy)
        if reason:
            refused.append({"key": "", "url": url, "stage": "download", "reason": reason})
        else:
            remote.append(row)
    return remote, local, refused


def prepare_url_list(remote: list[dict], path: Path) -> Path:
    import pyarrow as pa

    columns = ["url", "caption", *EXTRA_COLUMNS]
    table = pa.Table.from_pylist([{c: r[c] for c in columns} for r in remote],
                                 schema=pa.schema([("url", pa.string()), ("caption", pa.string()),
                                                   ("similarity", pa.float64()), ("source_id", pa.string()),
                                                   ("query", pa.string()), ("source", pa.string())]))
    return atomic_write_table(path, table)


def run_download(config, candidates: list[dict], work: Path, on_progress: Callable[[int, int], None],
                 cancel=None, hold_fds: tuple = ()) -> list[dict]:
    """Download every candidate; returns the refused-before-download failures. Safe to call again after
    any interruption: finished shards are kept."""
    policy = policy_for(config)
    folder = work / "download"
    remote_dir, local_dir = folder / "remote", folder / "local"
    remote_dir.mkdir(parents=True, exist_ok=True)
    local_dir.mkdir(parents=True, exist_ok=True)
    remote, local, refused = split_candidates(candidates, policy)
    atomic_write_jsonl(folder / "refused.jsonl", refused)
    total = len(remote) + len(local)
    local_shards = shard_count(len(local), config.samples_per_shard)

    def local_done() -> int:
        return sum(1 for s in range(local_shards) if (local_dir / f"{s:0{SHARD_DIGITS}d}.parquet").exists())

    def report(remote_done: int, _remote_total: int) -> None:
        local_rows = min(len(local), local_done() * config.samples_per_shard)
        on_progress(min(total, min(remote_done, len(remote)) + local_rows), total)

    url_list = folder / "urls.parquet"
    if remote:
        if not url_list.exists():
            prepare_url_list(remote, url_list)
        run_img2dataset(config, url_list, remote_dir, len(remote), report, cancel, folder / "img2dataset.log", hold_fds)
    report(len(remote), len(remote))
    for shard in range(local_shards):
        path = local_dir / f"{shard:0{SHARD_DIGITS}d}.parquet"
        if path.exists():
            continue
        if cancel is not None and cancel.is_set():
            raise Cancelled("Build cancelled; run it again to resume.")
        start = shard * config.samples_per_shard
        download_local_shard(local[start:start + config.samples_per_shard], shard, config, path)
        report(len(remote), len(remote))
    return refused


def downloaded_shards(work: Path) -> list[tuple[str, Path]]:
    """(shard name, parquet path) for every download shard, remote first, in key order."""
    folder = work / "download"
    remote = sorted((folder / "remote").glob("[0-9]*.parquet"))
    local = sorted((folder / "local").glob("[0-9]*.parquet"))
    return [(f"r{p.stem}", p) for p in remote] + [(f"l{p.stem}", p) for p in local]


def failure_from_row(row: dict) -> dict:
    stage = "resize" if row.get("status") == "failed_to_resize" else "download"
    reason = (row.get("error_message") or row.get("status") or "").strip()
    if "CV_IO_MAX_IMAGE_PIXELS" in reason:  # OpenCV's own words for a decompression bomb
        reason = "image has more pixels than max_image_pixels allows (decompression bomb guard)"
    return {"key": row.get("key"), "url": row.get("url"), "stage": stage, "reason": reason}

