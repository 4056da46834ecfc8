"""The build job: retrieve -> download -> caption -> condition -> write, resumable at any moment.

Every stage writes its output atomically (files.py), shard by shard, and a `done.json` marker when complete,
under DIR/.build/. A rerun after SIGKILL, a crash or cancel skips what is done and redoes only the unfinished
shard; outputs are keyed by img2dataset's deterministic sample keys, so nothing is lost or written twice.
A lock file keeps two builds out of the same folder.

What is never marked done: a stage that kept none of its samples. Every sample failing at once means a cause
outside the samples (a missing weight file, no network, an unreadable folder), so the stage's outputs are
removed and the build fails with the first reason; a rerun after the cause is gone redoes the stage. Before
anything is downloaded the chosen preprocessor is run once on a small probe image, so missing weights stop the
build with their own sentence instead of costing a download.
"""
from __future__ import annotations

import dataclasses
import fcntl
import json
import math
import time
from pathlib import Path
from typing import Callable, Optional

from lib_controlnet.dataset import writer
from lib_controlnet.dataset.config import BuildConfig, ConfigError
from lib_controlnet.dataset.download import Cancelled, downloaded_shards, failure_from_row
from lib_controlnet.dataset.files import atomic_write_json, atomic_write_table, read_jsonl
from lib_controlnet.errors import UserError

STAGES = ("retrieve", "download", "caption", "condition", "write")
# Options that may change between a run and its resume without making finished work stale.
RESUME_SAFE = {"thread_count", "processes_count", "distributor", "knn_timeout", "preview_count",
               "caption_batch_size", "timeout", "retries"}


@dataclasses.dataclass
class Progress:
    stage: str
    done: int
    total: int
    eta_seconds: Optional[float] = None
    message: str = ""

    @property
    def stage_index(self) -> int:
        return STAGES.index(self.stage)

    def line(self) -> str:
        eta = "" if self.eta_seconds is None else f", ETA {self.eta_seconds:.0f}s"
        return f"[{self.stage_index + 1}/{len(STAGES)} {self.stage}] {self.done}/{self.total}{eta} {self.message}".rstrip()


class _Tracker:
    """Per-stage progress with an ETA from the rate seen in this run."""

    def __init__(self, stage: str, callback: Optional[Callable[[Progress], None]]):
        self.stage, self.callback = stage, callback
        self.start, self.first_done = time.monotonic(), None

    def __call__(self, done: int, total: int, message: str = "") -> None:
        if self.callback is None:
            return
        if self.first_done is None:
            self.first_done = done
        eta = None
        elapsed = time.monotonic() - self.start
        gained = done - self.first_done
        if gained > 0 and total >= done:
            eta = (total - done) * elapsed / gained
        self.callback(Progress(self.stage, done, total, eta, message))


class BuildLocked(UserError):
    """Another build is writing into the same folder."""


class StageFailed(UserError):
    """A stage kept none of its samples; nothing of it is kept, so a rerun redoes it."""


# Stages that pass samples on: each must keep at least one, or the build has failed.
SAMPLE_STAGES = ("download", "caption", "condition", "write")


class BuildJob:
    def __init__(self, config: BuildConfig, progress: Optional[Callable[[Progress], None]] = None, cancel=None):
        config.require_runnable()
        self.config = config
        self.out = Path(config.out_dir)
        self.work = self.out / writer.WORK_DIR
        self.progress = progress
        self.cancel = cancel
        self.timings: dict[str, float] = {}
        self.lock_fd = -1

    # -- plumbing --
    def _check_cancel(self) -> None:
        if self.cancel is not None and self.cancel.is_set():
            raise Cancelled("Build cancelled; run it again to resume.")

    def _check_same_build(self) -> None:
        saved = self.work / "config.json"
        current = self.config.to_dict()
        if saved.exists():
            previous = json.loads(saved.read_text("utf-8"))
            changed = sorted(k for k in set(previous) | set(current)
                             if k not in RESUME_SAFE and k != "out_dir" and previous.get(k) != current.get(k))
            if changed:
                raise ConfigError(
                    f"{self.out} holds a build made with other options ({', '.join(changed)}); "
                    "resume it with the same options, or build into another folder."
                )
        atomic_write_json(saved, current)

    def _stage(self, name: str, body: Callable[[_Tracker], dict]) -> dict:
        marker = self.work / name / "done.json"
        if marker.exists():
            record = json.loads(marker.read_text("utf-8"))
            self.timings[name] = record["seconds"]
            if self.progress:
                self.progress(Progress(name, record.get("count", 0), record.get("count", 0), 0.0, "already done"))
            return record
        self._check_cancel()
        tracker = _Tracker(name, self.progress)
        start = time.monotonic()
        record = body(tracker) or {}
        record["seconds"] = round(time.monotonic() - start, 3)
        if name in SAMPLE_STAGES and self._kept(name, record) == 0:
            self._fail_stage(name)
        atomic_write_json(marker, record)
        self.timings[name] = record["seconds"]
        return record

    def _kept(self, name: str, record: dict) -> int:
        """How many samples `name` passes on (its record counts what it was given, for progress)."""
        import pyarrow.parquet as pq

        if name in ("download", "caption"):  # captioning drops nothing: it keeps what the download kept
            return self._count_successes()
        if name == "condition":
            return sum(sum(1 for e in pq.read_table(p, columns=["error"]).column("error").to_pylist() if e is None)
                       for p in sorted((self.work / "condition").glob("*.parquet")))
        return int(record.get("count", 0))

    def _fail_stage(self, name: str) -> None:
        import shutil

        failures = self.failures()
        writer.write_failures(self.out, failures)
        reasons = [f for f in failures if f.get("stage") in (name, "resize")] or failures
        # Remove the stage's work so no shard of it counts as done on the next run, whose cause may be fixed.
        shutil.rmtree(self.work / name, ignore_errors=True)
        reason = f" The first reason: {reasons[0]['reason']}." if reasons else ""
        raise StageFailed(f"The {name} stage kept none of the samples, so the build stopped and marked nothing of "
                          f"it done.{reason} See {self.out / writer.FAILURES}; fix the cause and run the build "
                          "again to redo the stage.")

    def _check_preprocessor(self) -> None:
        """Run the chosen preprocessor once on a small image: a missing weight file (or a module that cannot
        load) stops the build here, before any download, with the preprocessor's own sentence."""
        import numpy as np

        from lib_controlnet import preprocess

        if (self.work / "condition" / "done.json").exists():
            return
        probe = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
        resolution = preprocess.MIN_RESOLUTION  # loading the weights is the point: the cheapest size does it
        try:
            preprocess.run(self.config.module, probe, resolution=resolution, threshold_a=self.config.threshold_a,
                           threshold_b=self.config.threshold_b, use_cache=False)
        except UserError:
            raise
        except Exception as error:  # a weight file that cannot be read, a library that fails to load
            raise StageFailed(f"The {self.config.module} preprocessor cannot run ({type(error).__name__}: {error}); "
                              "nothing was downloaded.") from None

    # -- stages --
    def _retrieve(self, track: _Tracker) -> dict:
        import pyarrow as pa

        from lib_controlnet.dataset.sources import collect

        track(0, 1, "querying sources")
        rows = collect(self.config, on_progress=lambda done, total: track(done, total, "queries"))
        if not rows:
            raise UserError("The sources gave no candidate images; widen the prompts or check the URL list.")
        atomic_write_table(self.work / "retrieve" / "candidates.parquet", pa.Table.from_pylist(rows))
        track(len(rows), len(rows), "candidates")
        return {"count": len(rows)}

    def candidates(self) -> list[dict]:
        import pyarrow.parquet as pq

        return pq.read_table(self.work / "retrieve" / "candidates.parquet").to_pylist()

    def _download(self, track: _Tracker) -> dict:
        from lib_controlnet.dataset.download import run_download

        candidates = self.candidates()
        refused = run_download(self.config, candidates, self.work, lambda d, t: track(d, t, "images"), self.cancel,
                               hold_fds=(self.lock_fd,))
        return {"count": len(candidates) - len(refused), "refused": len(refused)}

    def _shard_rows(self, path: Path, with_image: bool = True) -> list[dict]:
        import pyarrow.parquet as pq

        fmt = self.config.encode_format
        columns = ["key", "url", "caption", "status", "error_message", "width", "height", "similarity", "source"]
        table = pq.read_table(path, columns=columns + ([fmt] if with_image else []))
        rows = []
        for row in table.to_pylist():
            if row["status"] == "success":
                if with_image:
                    row["image"] = row.pop(fmt)
                rows.append(row)
        return sorted(rows, key=lambda r: r["key"])

    def _count_successes(self) -> int:
        return sum(len(self._shard_rows(p, with_image=False)) for _, p in downloaded_shards(self.work))

    def _per_shard(self, stage: str, track: _Tracker, unit: str, handle: Callable[[str, list[dict], Callable], None]) -> dict:
        total, done = self._count_successes(), 0
        track(0, total, unit)
        for name, path in downloaded_shards(self.work):
            self._check_cancel()
            out = self.work / stage / f"{name}.parquet"
            rows = self._shard_rows(path, with_image=not out.exists())
            if not out.exists():
                base = done

                def step(count: int, base=base) -> None:
                    nonlocal done
                    done = min(total, done + count)
                    track(done, total, unit)

                handle(name, rows, step)
                done = base
            done += len(rows)
            track(done, total, unit)
        return {"count": total}

    def _caption(self, track: _Tracker) -> dict:
        import pyarrow as pa

        from lib_controlnet.dataset.caption import Captioner, caption_rows

        captioner = None
        if self.config.caption_mode != "source":
            captioner = Captioner(self.config.captioner_path, max_new_tokens=self.config.caption_max_tokens)

        def handle(name: str, rows: list[dict], step) -> None:
            result = caption_rows(rows, self.config, captioner, on_batch=step)
            schema = pa.schema([(c, pa.string()) for c in ("key", "text", "source_caption", "generated_caption")])
            atomic_write_table(self.work / "caption" / f"{name}.parquet", pa.Table.from_pylist(result, schema=schema))

        return self._per_shard("caption", track, "captions", handle)

    def _condition(self, track: _Tracker) -> dict:
        import pyarrow as pa

        from lib_controlnet.dataset.condition import condition_rows

        def handle(name: str, rows: list[dict], step) -> None:
            done, failures = condition_rows(rows, self.config, on_batch=step)
            records = [{"key": d["key"], "conditioning_image": d["conditioning_image"], "error": None} for d in done]
            records += [{"key": f["key"], "conditioning_image": None, "error": f["reason"]} for f in failures]
            schema = pa.schema([("key", pa.string()), ("conditioning_image", pa.binary()), ("error", pa.string())])
            atomic_write_table(self.work / "condition" / f"{name}.parquet", pa.Table.from_pylist(records, schema=schema))

        return self._per_shard("condition", track, f"{self.config.module} maps", handle)

    def _write(self, track: _Tracker) -> dict:
        import pyarrow.parquet as pq

        shards = downloaded_shards(self.work)
        written = 0
        for index, (name, path) in enumerate(shards):
            self._check_cancel()
            marker = self.work / "write" / f"{name}.done"
            if marker.exists():
                written += int(marker.read_text() or 0)
                track(index + 1, len(shards), "shards")
                continue
            captions = {r["key"]: r for r in pq.read_table(self.work / "caption" / f"{name}.parquet").to_pylist()}
            maps = {r["key"]: r["conditioning_image"]
                    for r in pq.read_table(self.work / "condition" / f"{name}.parquet").to_pylist() if r["error"] is None}
            samples = []
            for row in self._shard_rows(path):
                if row["key"] not in maps:
                    continue
                caption = captions[row["key"]]
                samples.append(writer.Sample(
                    key=row["key"], image=row["image"], image_ext=self.config.encode_format,
                    conditioning_image=maps[row["key"]], text=caption["text"], url=row["url"],
                    width=row["width"], height=row["height"], source=row["source"] or "",
                    similarity=math.nan if row["similarity"] is None else row["similarity"],
                    source_caption=caption["source_caption"], generated_caption=caption["generated_caption"],
                ))
            writer.write_shard(self.out, name, samples)
            have = len(writer.preview_pairs(self.out))
            if have < self.config.preview_count:
                writer.write_preview(self.out, samples, self.config.preview_count - have)
            marker.parent.mkdir(parents=True, exist_ok=True)
            from lib_controlnet.dataset.files import atomic_write_text

            atomic_write_text(marker, str(len(samples)))
            written += len(samples)
            track(index + 1, len(shards), "shards")
        return {"count": written}

    def failures(self) -> list[dict]:
        import pyarrow.parquet as pq

        rows = list(read_jsonl(self.work / "download" / "refused.jsonl"))
        for _, path in downloaded_shards(self.work):
            table = pq.read_table(path, columns=["key", "url", "status", "error_message"])
            rows += [failure_from_row(r) for r in table.to_pylist() if r["status"] != "success"]
        urls = {}
        for name, path in downloaded_shards(self.work):
            urls.update({r["key"]: r["url"] for r in pq.read_table(path, columns=["key", "url"]).to_pylist()})
            cond = self.work / "condition" / f"{name}.parquet"
            if cond.exists():
                for r in pq.read_table(cond, columns=["key", "error"]).to_pylist():
                    if r["error"] is not None:
                        rows.append({"key": r["key"], "url": urls.get(r["key"], ""), "stage": "condition", "reason": r["error"]})
        return rows

    def run(self) -> dict:
        self.work.mkdir(parents=True, exist_ok=True)
        with open(self.work / "lock", "w") as lock:
            deadline = time.monotonic() + 3.0  # a killed build's downloader group needs a moment to die
            while True:
                try:
                    fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        raise BuildLocked(f"Another build is running in {self.out}; wait for it or cancel it.") from None
                    time.sleep(0.1)
            self.lock_fd = lock.fileno()
            self._check_same_build()
            self._check_preprocessor()
            records = {}
            for name in STAGES:
                records[name] = self._stage(name, getattr(self, f"_{name}"))
            return self._finish(records)

    def _finish(self, records: dict) -> dict:
        failures = self.failures()
        writer.write_failures(self.out, failures)
        writer.write_card(self.out)
        reasons: dict[str, int] = {}
        for failure in failures:
            reasons[failure["stage"]] = reasons.get(failure["stage"], 0) + 1
        manifest = {
            "format": "controlnet-studio-dataset/1",
            "config": self.config.to_dict(),
            "counts": {
                "candidates": records["retrieve"].get("count", 0),
                "refused": records["download"].get("refused", 0),
                "downloaded": records["caption"].get("count", 0),
                "written": records["write"].get("count", 0),
                "failed": len(failures),
                "failed_by_stage": reasons,
            },
            "timings_seconds": dict(self.timings),
            "data_files": [str(p.relative_to(self.out)) for p in writer.data_files(self.out)],
            "columns": list(writer.dataset_features()),
        }
        writer.write_manifest(self.out, manifest)
        return manifest


def run_build(config: BuildConfig, progress: Optional[Callable[[Progress], None]] = None, cancel=None) -> dict:
    """Build (or resume) the dataset described by `config`; returns the manifest."""
    return BuildJob(config, progress, cancel).run()
