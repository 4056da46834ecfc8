"""The Train tab inside the WebUI trains against the loaded checkpoint: VAE and text encoder from its file, the
UNet weights from the model the WebUI holds in memory (stand-in `modules.shared.sd_model`)."""
from __future__ import annotations

import types
from pathlib import Path

import pytest
import torch

from control_fixtures import ldm_unet_like
from lib_controlnet.errors import UserError
from lib_controlnet.tiny_models import save_tiny_diffusers_base
from lib_controlnet.train.config import TrainConfig
from lib_controlnet.train.runner import BackgroundTraining
from lib_controlnet.train.synthetic import write_folder_pair
from tiny_checkpoint import write_tiny_single_file
from webui_standin.activate import standin_webui

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def webui_model(tmp_path_factory):
    """A checkpoint file, and the WebUI's loaded model whose UNet weights differ from the file's (a merge or an
    edit made in memory)."""
    root = tmp_path_factory.mktemp("train-base")
    with standin_webui(root):
        yield _loaded_model(root)


def _loaded_model(root: Path) -> dict:
    from modules import shared

    save_tiny_diffusers_base(root / "base")
    pipeline = write_tiny_single_file(root / "base", root / "tiny-sd15.safetensors")
    in_memory = ldm_unet_like(pipeline.unet, "sd15")
    with torch.no_grad():
        for param in in_memory.parameters():
            param.add_(0.01)
    shared.sd_model = types.SimpleNamespace(sd_checkpoint_info=types.SimpleNamespace(filename=str(root / "tiny-sd15.safetensors")),
                                            model=types.SimpleNamespace(diffusion_model=in_memory), is_sdxl=False)
    return dict(root=root, unet=in_memory, shared=shared)


def test_base_has_the_in_memory_unet_weights(webui_model):
    from lib_controlnet.models import unet_diffusers_to_ldm
    from lib_controlnet.webui import train_base

    assert train_base.loaded_checkpoint_path().endswith("tiny-sd15.safetensors")
    base = train_base.loaded_checkpoint_base(TrainConfig(base_config=str(webui_model["root"] / "base")))
    ours = unet_diffusers_to_ldm(base.unet.state_dict())
    expected = webui_model["unet"].state_dict()
    assert set(ours) == set(expected)
    assert all(torch.equal(ours[k], expected[k]) for k in expected)


def test_training_runs_from_the_loaded_checkpoint(webui_model):
    from lib_controlnet.webui import train_base

    root = webui_model["root"]
    write_folder_pair(root / "pairs", 4, seed=1)
    config = TrainConfig(dataset=str(root / "pairs"), base=train_base.loaded_checkpoint_path(),
                         base_config=str(root / "base"), output_dir=str(root / "run"), resolution=64,
                         max_train_steps=2, train_batch_size=2, export_dir=str(root / "models"), export_dtype="fp32")
    runner = BackgroundTraining(base_provider=train_base.loaded_checkpoint_base)
    runner.start(config, use_base_provider=True)
    runner.wait(300)
    assert runner.error is None, runner.status_text()
    assert runner.result.steps == 2 and runner.result.exported.is_file()


def test_no_loaded_checkpoint_is_one_sentence(webui_model, monkeypatch):
    from lib_controlnet.webui import train_base

    monkeypatch.setattr(webui_model["shared"], "sd_model", None)
    with pytest.raises(UserError, match="No checkpoint is loaded"):
        train_base.loaded_checkpoint_path()


def test_sdxl_training_from_the_loaded_sgm_model(tmp_path):
    """An SDXL checkpoint loaded in the WebUI (sgm UNetModel with label_emb, weights edited in memory): the base
    gets both text encoders from the file and the in-memory UNet, and a short training run exports an SDXL
    ControlNet. One transformer depth on every level, as the ldm class (standing in for sgm's) holds."""
    from diffusers import UNet2DConditionModel

    from lib_controlnet.models import inspect_model, unet_diffusers_to_ldm
    from lib_controlnet.webui import train_base
    from tiny_checkpoint import write_tiny_sdxl_single_file

    with standin_webui(tmp_path):
        from modules import shared

        write_tiny_sdxl_single_file(tmp_path / "xl.safetensors", config_dir=tmp_path / "xl-config",
                                    transformer_layers_per_block=1)
        in_memory = ldm_unet_like(UNet2DConditionModel.from_pretrained(tmp_path / "xl-config", subfolder="unet"),
                                  "sdxl")
        with torch.no_grad():
            for param in in_memory.parameters():
                param.add_(0.01)
        shared.sd_model = types.SimpleNamespace(
            sd_checkpoint_info=types.SimpleNamespace(filename=str(tmp_path / "xl.safetensors")),
            model=types.SimpleNamespace(diffusion_model=in_memory), is_sdxl=True)
        write_folder_pair(tmp_path / "pairs", 4, seed=1)
        config = TrainConfig(dataset=str(tmp_path / "pairs"), base=train_base.loaded_checkpoint_path(),
                             base_config=str(tmp_path / "xl-config"), output_dir=str(tmp_path / "run"),
                             resolution=64, max_train_steps=2, train_batch_size=2,
                             export_dir=str(tmp_path / "models"), export_dtype="fp32")
        base = train_base.loaded_checkpoint_base(config)
        assert base.is_sdxl
        ours, expected = unet_diffusers_to_ldm(base.unet.state_dict()), in_memory.state_dict()
        assert set(ours) == set(expected) and all(torch.equal(ours[k], expected[k]) for k in expected)
        runner = BackgroundTraining(base_provider=train_base.loaded_checkpoint_base)
        runner.start(config, use_base_provider=True)
        runner.wait(300)
        assert runner.error is None, runner.status_text()
        assert inspect_model(runner.result.exported).base.startswith("sdxl")  # tiny depths read as "mid"
