"""`make demo` end to end at a small size (shapes base -> dataset builder -> training with fidelity rounds ->
export -> registry -> generation with and without the ControlNet -> report), then what a user does with its
outputs: read the fidelity in the training report and the exported file, and `evaluate` the exported ControlNet
on the demo's dataset (a ControlNet at weight 0 must score exactly the no-ControlNet baseline)."""
import json
import re
import shutil
from pathlib import Path

import pytest
from safetensors import safe_open

from lib_controlnet.cli import main


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    import contextlib
    import io

    out = tmp_path_factory.mktemp("demo") / "demo"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        code = main(["demo", "--out", str(out), "--images", "12", "--steps", "2", "--rounds", "2", "--held-out", "2"])
    assert code == 0
    return out, printed.getvalue().strip().splitlines()


def test_demo_runs_the_whole_loop(demo):
    out, lines = demo
    exported = Path(lines[-2].split("exported: ", 1)[1])
    report = Path(lines[-1].split("report: ", 1)[1])
    assert exported.suffix == ".safetensors" and exported.is_file() and report == out / "report.md"
    summary = json.loads((out / "demo.json").read_text())
    assert set(summary["shape_iou"]) == {"untrained", "trained"}
    for kind in ("condition", "untrained", "trained"):
        assert len(list((out / "generated").glob(f"{kind}-*.png"))) == 2


def test_training_scores_fidelity_each_round(demo):
    out, lines = demo
    history = json.loads((out / "training" / "fidelity.json").read_text())
    assert history["score"] == "edge_f1" and history["module"] == "canny" and history["samples"] == 2
    assert [step for step, _ in history["rounds"]] == [0, 1, 2]  # step 0 = untrained, then every validation step
    assert history["untrained"] == history["rounds"][0][1] and history["latest"] == history["rounds"][-1][1]
    assert all(0.0 <= value <= 1.0 for _, value in history["rounds"])
    # the progress stream carried each round's score at its step (the demo prints it)
    for step, value in history["rounds"][1:]:
        assert f"step {step}/2 fidelity {value:.3f}" in "\n".join(lines)
    report = (out / "training" / "report.md").read_text()
    assert "## Control fidelity" in report and "edge_f1" in report and "held-out rows" in report
    assert (out / "training" / "fidelity_curve.png").is_file()
    with safe_open(str(out / "models" / "demo-shapes.safetensors"), "pt") as handle:
        metadata = json.loads(handle.metadata()["controlnet_studio.fidelity"])
    assert metadata["rounds"] == history["rounds"] and metadata["score"] == "edge_f1"


def test_evaluate_writes_report_and_weight_zero_is_the_baseline(demo, tmp_path, capsys):
    out, _ = demo
    common = ["evaluate", "--base", str(out / "base"), "--controlnet", str(out / "models" / "demo-shapes.safetensors"),
              "--dataset", str(out / "dataset"), "--n", "2", "--steps", "2"]
    assert main(common + ["--out", str(tmp_path / "full")]) == 0
    assert "report:" in capsys.readouterr().out
    summary = json.loads((tmp_path / "full" / "report.json").read_text())
    assert summary["score"] == "edge_f1" and summary["module"] == "canny" and summary["samples"] == 2
    assert (tmp_path / "full" / "grid.png").is_file()
    assert "![grid](grid.png)" in (tmp_path / "full" / "report.md").read_text()
    assert main(common + ["--out", str(tmp_path / "zero"), "--weight", "0"]) == 0
    zero = json.loads((tmp_path / "zero" / "report.json").read_text())
    assert zero["per_sample"] == zero["baseline_per_sample"] == summary["baseline_per_sample"]


def test_evaluate_refuses_unknown_module(demo, tmp_path, capsys):
    out, _ = demo
    model = str(out / "models" / "demo-shapes.safetensors")
    assert main(["evaluate", "--base", str(out / "base"), "--controlnet", model,
                 "--dataset", str(out / "dataset"), "--module", "no_such_module", "--out", str(tmp_path / "x")]) == 2
    assert "no_such_module" in capsys.readouterr().err


def test_demo_report_links_survive_a_move(demo, tmp_path):
    out, _ = demo
    moved = tmp_path / "moved"
    shutil.copytree(out, moved)
    text = (moved / "report.md").read_text()
    links = re.findall(r"\]\(([^)]+)\)", text)
    assert len(links) >= 6 and str(out) not in text
    assert all(not Path(link).is_absolute() and (moved / link).exists() for link in links)
    assert "models/demo-shapes.safetensors" in links and "training/fidelity_curve.png" in links
