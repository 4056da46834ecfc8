"""The frame of benchmarks/gpu_suite.py: time limits, GPU-aware timing and memory, and the table + JSON it writes.

Every section runs under a `Deadline`; its loops ask `deadline.expired()` between iterations (never inside one,
so a figure is always a whole measurement) and report what they measured by then. A section records `Row`s:
a figure of ours beside its peer's and their ratio, or a "not available: why" / "not measured: why" line.
"""
from __future__ import annotations

import dataclasses
import json
import statistics
import time
from pathlib import Path
from typing import Callable, Optional


class Deadline:
    """Seconds left for one section (never past the whole run's own deadline)."""

    def __init__(self, seconds: float, outer: Optional["Deadline"] = None):
        end = time.monotonic() + seconds
        self.end = min(end, outer.end) if outer is not None else end
        self.limit = seconds

    def left(self) -> float:
        return self.end - time.monotonic()

    def expired(self) -> bool:
        return self.left() <= 0

    def share(self, parts_left: int) -> "Deadline":
        """A sub-deadline holding an even share of what is left, for one of `parts_left` variants."""
        return Deadline(max(self.left(), 0.0) / max(parts_left, 1), self)


@dataclasses.dataclass
class Row:
    section: str
    item: str
    unit: str = ""  # what `ours` / `peer` count: "s/step", "samples/s", "images/s", "s/map"
    ours: Optional[float] = None
    peer: Optional[float] = None
    peer_name: str = ""
    ratio: Optional[float] = None  # ours / peer for times, ours / peer for rates as well: see `better`
    better: str = ""  # "lower" or "higher": which way the ratio is good
    ours_peak_gb: Optional[float] = None
    peer_peak_gb: Optional[float] = None
    samples: int = 0  # timed iterations behind `ours`
    status: str = "measured"  # or "not available: why" / "not measured: why" / "failed: why"
    note: str = ""

    @property
    def measured(self) -> bool:
        return self.status == "measured"


class Device:
    """Synchronisation and peak-memory counters for the device in use; on the CPU they are no-ops / None."""

    def __init__(self, torch_device):
        self.device = torch_device
        self.cuda = torch_device.type == "cuda"

    def sync(self) -> None:
        if self.cuda:
            import torch

            torch.cuda.synchronize()

    def reset_peak(self) -> None:
        if self.cuda:
            import torch

            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()

    def allocated_gb(self) -> Optional[float]:
        if not self.cuda:
            return None
        import torch

        return torch.cuda.memory_allocated() / 2**30

    def peak_gb(self) -> Optional[float]:
        if not self.cuda:
            return None
        import torch

        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() / 2**30

    def free(self) -> None:
        import gc

        gc.collect()
        if self.cuda:
            import torch

            torch.cuda.empty_cache()

    def timed(self, fn: Callable[[], object]) -> float:
        """Seconds for one call, the device's queue drained before and after."""
        self.sync()
        started = time.perf_counter()
        fn()
        self.sync()
        return time.perf_counter() - started


def median(values) -> Optional[float]:
    values = list(values)
    return float(statistics.median(values)) if values else None


def ratio(ours: Optional[float], peer: Optional[float]) -> Optional[float]:
    if ours is None or peer is None or peer == 0:
        return None
    return ours / peer


# ---------------------------------------------------------------------------------------------- output
def _cell(value: Optional[float], digits: int = 4) -> str:
    if value is None:
        return ""
    if abs(value) >= 100:
        return f"{value:.1f}"
    return f"{value:.{digits}g}"


def markdown(rows: list[Row], header: str) -> str:
    lines = [header, "",
             "| section | what | ours | peer | unit | ours/peer | better | peak GB ours / peer | n | note |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for row in rows:
        if not row.measured:
            lines.append(f"| {row.section} | {row.item} | {row.status} | | | | | | | {row.note} |")
            continue
        peak = ""
        if row.ours_peak_gb is not None or row.peer_peak_gb is not None:
            peak = f"{_cell(row.ours_peak_gb, 3) or '-'} / {_cell(row.peer_peak_gb, 3) or '-'}"
        peer = f"{_cell(row.peer)} ({row.peer_name})" if row.peer is not None else ""
        ratio_cell = f"{row.ratio:.3f}" if row.ratio is not None else ""
        lines.append(f"| {row.section} | {row.item} | {_cell(row.ours)} | {peer} | {row.unit} | {ratio_cell} | "
                     f"{row.better} | {peak} | {row.samples} | {row.note} |")
    lines += ["", "Ratios are ours / peer. Peak GB: sampling = most allocated during the steps, with every model of the "
              "section resident (both UNets, 3 ControlNets), so rows differ by what the steps add; training = most "
              "allocated during the timed steps, the shared frozen base included; preprocessors = what one call "
              "allocated above what was there before it."]
    return "\n".join(lines) + "\n"


def write(out_dir: Path, rows: list[Row], meta: dict) -> tuple[Path, Path]:
    """gpu_suite.md (the table) and gpu_suite.json (the same rows, and what ran where) in `out_dir`."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    header = (f"GPU suite on {meta['device_name']} ({meta['mode']}), torch {meta['torch']}, diffusers "
              f"{meta['diffusers']}, {meta['elapsed_s']:.0f} s in all")
    table = markdown(rows, header)
    md_path, json_path = out_dir / "gpu_suite.md", out_dir / "gpu_suite.json"
    md_path.write_text(table, encoding="utf-8")
    json_path.write_text(json.dumps({"meta": meta, "rows": [dataclasses.asdict(r) for r in rows]}, indent=1),
                         encoding="utf-8")
    return md_path, json_path
