"""Control fidelity in the loop, as a user meets it: `evaluate` on a tiny model and a built dataset writes its
report (and a ControlNet at weight 0 scores exactly the no-ControlNet baseline); training scores fidelity on
held-out rows every validation round, from the step-0 baseline, into the progress stream, the report and the
exported file's metadata."""
import json
from pathlib import Path

import pytest
from safetensors import safe_open

from lib_controlnet.cli import main


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from lib_controlnet.dataset.config import BuildConfig
    from lib_controlnet.dataset.job import run_build
    from lib_controlnet.shapes import write_images
    from lib_controlnet.tiny_models import save_tiny_diffusers_base

    root = tmp_path_factory.mktemp("fidelity")
    write_images(root / "shapes", 16, size=64, seed=0)
    run_build(BuildConfig(out_dir=str(root / "dataset"), image_dir=str(root / "shapes"), image_size=64,
                          resize_mode="center_crop", module="canny", encode_format="png", encode_quality=9, thread_count=2,
                          processes_count=1, preview_count=0))
    base = save_tiny_diffusers_base(root / "base")
    return root, root / "dataset", base


@pytest.fixture(scope="module")
def trained(setup):
    from lib_controlnet.train.config import TrainConfig
    from lib_controlnet.train.trainer import TrainCallbacks, Trainer

    root, dataset, base = setup
    events = []
    config = TrainConfig(dataset=str(dataset), base=str(base), output_dir=str(root / "train"), resolution=64,
                         max_train_steps=4, train_batch_size=2, learning_rate=1e-3, validation_steps=2,
                         validation_inference_steps=2, fidelity_samples=3, checkpointing_steps=4,
                         export_dir=str(root / "models"), export_name="fid")
    result = Trainer(config, TrainCallbacks(on_progress=events.append)).run()
    return result, events


def test_training_scores_fidelity_each_round(trained):
    result, events = trained
    history = result.fidelity
    assert history.score == "edge_f1" and history.module == "canny" and history.samples == 3
    assert [step for step, _ in history.rounds] == [0, 2, 4]
    assert all(0.0 <= value <= 1.0 for _, value in history.rounds)
    # the progress stream carries the scores at the steps they were measured, the baseline from the start
    with_fidelity = {e.step: e.metrics["fidelity"] for e in events if "fidelity" in e.metrics}
    assert with_fidelity[2] == history.rounds[1][1] and with_fidelity[4] == history.rounds[2][1]
    assert all(e.metrics.get("fidelity_untrained") == history.untrained for e in events if e.metrics)
    assert "fidelity" not in events[0].metrics  # step 1 has no round of its own
    assert len([e for e in events]) == 4  # one event per step: the loss stream is not doubled
    # 16 rows, 3 held out: the other 13 train (batch 2 -> 6 batches per epoch)
    report = Path(result.report).read_text()
    assert "## Control fidelity" in report and "edge_f1" in report and "fidelity_curve.png" in report
    assert (Path(result.report).parent / "fidelity_curve.png").is_file()
    saved = json.loads((Path(result.report).parent / "fidelity.json").read_text())
    assert saved["rounds"] == history.rounds and saved["untrained"] == history.untrained
    with safe_open(str(result.exported), "pt") as handle:
        metadata = json.loads(handle.metadata()["controlnet_studio.fidelity"])
    assert metadata["rounds"] == history.rounds and metadata["score"] == "edge_f1"


def test_evaluate_writes_report_and_weight_zero_is_the_baseline(setup, trained, tmp_path, capsys):
    root, dataset, base = setup
    result, _ = trained
    common = ["evaluate", "--base", str(base), "--controlnet", str(result.exported), "--dataset", str(dataset),
              "--n", "2", "--steps", "2"]
    assert main(common + ["--out", str(tmp_path / "full")]) == 0
    assert "report:" in capsys.readouterr().out
    summary = json.loads((tmp_path / "full" / "report.json").read_text())
    assert summary["score"] == "edge_f1" and summary["module"] == "canny" and summary["samples"] == 2
    assert (tmp_path / "full" / "grid.png").is_file()
    assert "![grid](grid.png)" in (tmp_path / "full" / "report.md").read_text()
    assert main(common + ["--out", str(tmp_path / "zero"), "--weight", "0"]) == 0
    zero = json.loads((tmp_path / "zero" / "report.json").read_text())
    assert zero["per_sample"] == zero["baseline_per_sample"]
    assert zero["baseline_per_sample"] == summary["baseline_per_sample"]


def test_evaluate_refuses_unknown_module(setup, trained, tmp_path, capsys):
    root, dataset, base = setup
    result, _ = trained
    assert main(["evaluate", "--base", str(base), "--controlnet", str(result.exported), "--dataset", str(dataset),
                 "--module", "no_such_module", "--out", str(tmp_path / "x")]) == 2
    assert "no_such_module" in capsys.readouterr().err
