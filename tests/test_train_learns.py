"""A short CPU training on a task only the conditioning image can solve lowers the held-out denoising loss
clearly; the exported ldm file reproduces the trained model's loss, carries its metadata, and shows up in the
registry; `export CKPT OUT` and the report work."""
import json

import pytest
from safetensors import safe_open

from lib_controlnet.tiny_models import save_tiny_diffusers_base
from lib_controlnet.train.base import load_base
from lib_controlnet.train.config import TrainConfig
from lib_controlnet.train.data import TrainDataset, collate, open_records
from lib_controlnet.train.step import heldout_loss
from lib_controlnet.train.synthetic import CAPTION, write_folder_pair
from lib_controlnet.train.trainer import TrainCallbacks, Trainer

STEPS = 60


@pytest.fixture(scope="module")
def trained(tmp_path_factory, one_torch_thread):
    root = tmp_path_factory.mktemp("train_learns")
    save_tiny_diffusers_base(root / "base")
    write_folder_pair(root / "train", 32, seed=1)
    write_folder_pair(root / "heldout", 8, seed=2)
    config = TrainConfig(dataset=str(root / "train"), base=str(root / "base"), output_dir=str(root / "out"),
                         resolution=64, max_train_steps=STEPS, train_batch_size=4, learning_rate=1e-3,
                         checkpointing_steps=1000, export_dir=str(root / "models"), export_name="squares",
                         export_dtype="fp32", validation_prompts=[CAPTION],
                         validation_images=[str(root / "heldout" / "conditioning" / "0000.png")],
                         validation_steps=STEPS // 2, validation_inference_steps=2)
    progress = []
    trainer = Trainer(config, TrainCallbacks(on_progress=progress.append))
    result = trainer.run()
    base = load_base(config.base)
    held = TrainDataset(open_records(config.replace(dataset=str(root / "heldout"))), config)
    batches = [collate([held[(i, 0, 64, 64)] for i in range(start, start + 4)]) for start in (0, 4)] * 2
    return dict(root=root, config=config, result=result, trainer=trainer, base=base, batches=batches,
                progress=progress)


def test_training_lowers_heldout_loss_and_export_reproduces_it(trained):
    from diffusers import ControlNetModel

    from lib_controlnet.models import load_controlnet

    base, batches, result = trained["base"], trained["batches"], trained["result"]
    untrained = heldout_loss(base, ControlNetModel.from_unet(base.unet), batches)
    after = heldout_loss(base, trained["trainer"].trained_controlnet, batches)
    assert after < 0.8 * untrained, (untrained, after)

    assert result.exported.name == "squares.safetensors"
    reloaded = load_controlnet(result.exported)
    assert heldout_loss(base, reloaded, batches) == pytest.approx(after, rel=1e-5)


def test_progress_validation_and_report(trained):
    result, progress = trained["result"], trained["progress"]
    assert [p.step for p in progress] == list(range(1, STEPS + 1))
    assert progress[-1].eta_s == 0 and progress[1].eta_s > 0
    assert [step for step, _ in result.validation] == [STEPS // 2, STEPS]
    assert all(path.is_file() for _, images in result.validation for _, _, path in images)
    report = result.report.read_text()
    assert str(result.exported) in report and "loss_curve.png" in report
    assert (result.output_dir / "loss_curve.png").stat().st_size > 1000
    assert (result.output_dir / "validation_grid.png").is_file()
    assert json.loads((result.output_dir / "losses.json").read_text()) == result.losses


def test_export_metadata_and_registry(trained):
    from lib_controlnet.models import get_registry
    from lib_controlnet.settings import get_settings, update_settings
    from lib_controlnet.train.base import base_hash

    exported = trained["result"].exported
    with safe_open(str(exported), framework="pt") as handle:
        meta = handle.metadata()
        assert all(key.startswith("control_model.") for key in handle.keys())
    assert meta["controlnet_studio.steps"] == str(STEPS)
    assert meta["controlnet_studio.base_model_sha256"] == base_hash(trained["config"].base)
    assert json.loads(meta["controlnet_studio.arguments"])["learning_rate"] == 1e-3

    previous = list(get_settings().model_dirs)
    update_settings(model_dirs=[exported.parent])
    try:
        registry = get_registry()
        registry.refresh()
        assert any(name.startswith("squares [") for name in registry.names())
    finally:
        update_settings(model_dirs=previous)
        get_registry().refresh()


def test_export_command_writes_fp16_file_from_checkpoint(trained, tmp_path):
    from lib_controlnet.cli import main
    from lib_controlnet.models import inspect_model

    out = tmp_path / "again.safetensors"
    assert main(["export", str(trained["result"].output_dir), str(out)]) == 0
    info = inspect_model(out)
    assert info.dtype == "fp16"
    assert main(["export", str(tmp_path / "nothing-here"), str(out)]) == 2
