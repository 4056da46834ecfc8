"""What a dataset folder holds: rows, columns, shards, failures by stage and reason, and how far its build got."""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from lib_controlnet.dataset import writer
from lib_controlnet.dataset.files import read_jsonl
from lib_controlnet.errors import UserError


def dataset_info(folder: str | Path) -> dict:
    import pyarrow.parquet as pq

    out = Path(folder)
    if not out.is_dir():
        raise UserError(f"Dataset folder {out} does not exist.")
    files = writer.data_files(out)
    manifest_path = out / writer.MANIFEST
    manifest = json.loads(manifest_path.read_text("utf-8")) if manifest_path.exists() else None
    work = out / writer.WORK_DIR
    stages_done = [s for s in ("retrieve", "download", "caption", "condition", "write") if (work / s / "done.json").exists()]
    if not files and manifest is None and not stages_done:
        raise UserError(f"{out} is not a dataset built by ControlNet Studio (no data/train-*.parquet, no manifest).")
    rows = sum(pq.ParquetFile(p).metadata.num_rows for p in files)
    columns = pq.ParquetFile(files[0]).schema_arrow.names if files else []
    failures = read_jsonl(out / writer.FAILURES)
    by_stage = Counter(f.get("stage", "?") for f in failures)
    reasons = Counter(f"{f.get('stage')}: {str(f.get('reason'))[:80]}" for f in failures)
    return {
        "folder": str(out.resolve()),
        "complete": manifest is not None and len(stages_done) == 5,
        "stages_done": stages_done,
        "rows": rows,
        "shards": len(files),
        "columns": columns,
        "bytes": sum(p.stat().st_size for p in files),
        "failures": len(failures),
        "failures_by_stage": dict(by_stage),
        "top_failure_reasons": reasons.most_common(8),
        "timings_seconds": (manifest or {}).get("timings_seconds", {}),
        "previews": len(writer.preview_pairs(out)),
    }


def format_info(info: dict) -> str:
    lines = [
        f"{info['folder']}: {'complete' if info['complete'] else 'INCOMPLETE (stages done: ' + ', '.join(info['stages_done']) + ')'}",
        f"rows {info['rows']} in {info['shards']} shard(s), {info['bytes'] / 1e6:.1f} MB; previews {info['previews']}",
        f"columns: {', '.join(info['columns'])}",
        f"failures: {info['failures']} {info['failures_by_stage']}",
    ]
    lines += [f"  {count:5d}  {reason}" for reason, count in info["top_failure_reasons"]]
    if info["timings_seconds"]:
        lines.append("timings: " + ", ".join(f"{k} {v:.1f}s" for k, v in info["timings_seconds"].items()))
    return "\n".join(lines)
