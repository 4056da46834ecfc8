"""benchmarks/gpu_suite.py --tiny: the GPU suite's own code on the CPU at tiny sizes, run as a user runs it, so the
script cannot rot while no GPU is around. Reads the table and the JSON it wrote."""
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SECTIONS = ["SD1.5 sampling", "SDXL sampling", "SD1.5 training", "SDXL training", "preprocessors", "dataset builder"]


def test_tiny_run_writes_every_section_with_a_figure_or_a_reason(tmp_path):
    out = tmp_path / "suite"
    env = dict(os.environ, HF_HOME=str(tmp_path / "hf"), HF_DATASETS_CACHE=str(tmp_path / "hf-datasets"),
               TORCH_HOME=str(tmp_path / "torch"), PYTHONPATH=str(ROOT))
    done = subprocess.run([sys.executable, "-W", "ignore", str(ROOT / "benchmarks" / "gpu_suite.py"), "--tiny",
                           "--out", str(out)], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]

    report = json.loads((out / "gpu_suite.json").read_text())
    rows = report["rows"]
    assert report["meta"]["device_name"] == "CPU" and report["meta"]["mode"].startswith("tiny")
    assert [s for s in SECTIONS if not any(r["section"] == s for r in rows)] == []
    for row in rows:
        where = f"{row['section']} / {row['item']}"
        if row["status"] == "measured":
            assert row["ours"] > 0 and row["samples"] >= 1, where
            if row["peer_name"]:
                assert row["peer"] > 0 and abs(row["ratio"] - row["ours"] / row["peer"]) < 1e-9, where
        else:
            # only reasons that hold on any machine: nothing failed and no tiny section ran out of time
            assert row["status"].startswith("not available: ") and len(row["status"]) > 30, (where, row["status"])

    def measured(section):
        return [r for r in rows if r["section"] == section and r["status"] == "measured"]

    # what the suite is for: both hosts and every unit/mode case against its peer, both training settings
    for family in ("SD1.5", "SDXL"):
        sampling = measured(f"{family} sampling")
        assert len(sampling) == 10, [r["item"] for r in sampling]
        assert sum(1 for r in sampling if "ControlNet pipeline" in r["peer_name"]) == 4
        assert sum(1 for r in sampling if r["peer_name"] == "ldm UNetModel alone") == 4
    assert len(measured("SD1.5 training")) == 2
    assert all(r["peer_name"] == "train_controlnet.py step" for r in measured("SD1.5 training"))
    assert {r["item"].split(" (")[0] for r in measured("preprocessors")} >= {"canny", "HED", "line art"}
    assert measured("dataset builder")[0]["unit"] == "images/s"

    table = (out / "gpu_suite.md").read_text()
    assert "| section | what | ours | peer |" in table
    assert all(f"| {section} |" in table for section in SECTIONS)
    assert table in done.stdout  # the same table is printed


def test_a_section_deadline_stops_between_iterations_and_keeps_what_was_measured():
    """Sections loop through benchmarks._pipeline_steps.interleaved under a Deadline: past the limit no new run
    starts, and the runs done so far are the section's figures."""
    import time

    sys.path.insert(0, str(ROOT))
    from benchmarks._pipeline_steps import interleaved
    from benchmarks._suite import Deadline

    outer = Deadline(60)
    deadline = Deadline(0.25, outer)
    started = time.monotonic()

    def run():
        time.sleep(0.1)
        return time.monotonic() - started

    results = interleaved({"a": run, "b": run}, rounds=100, expired=deadline.expired)
    elapsed = time.monotonic() - started
    assert 0.25 <= elapsed < 0.25 + 0.1 + 0.2  # at most the iteration under way when the limit passed
    assert len(results["a"]) >= 1 and len(results["a"]) + len(results["b"]) < 200
    assert all(t <= elapsed for t in results["a"] + results["b"])
    assert Deadline(1000, outer).end == outer.end  # never past the whole run's deadline
