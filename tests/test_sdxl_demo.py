"""`demo --arch sdxl` at tiny size: the shapes dataset -> SDXL training with validation images and control fidelity
-> ldm export -> registry -> generation, read back from the files the command wrote; the validation image equals
diffusers' StableDiffusionXLControlNetPipeline on the same ControlNet, and `evaluate` scores the SDXL export."""
import contextlib
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

from lib_controlnet.cli import main

pytestmark = pytest.mark.usefixtures("one_torch_thread")
SAMPLE_STEPS = 2


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("sdxl_demo") / "demo"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        code = main(["demo", "--arch", "sdxl", "--out", str(out), "--images", "12", "--steps", "1", "--rounds", "1",
                     "--held-out", "1", "--sample-steps", str(SAMPLE_STEPS)])
    assert code == 0
    return out, printed.getvalue().strip().splitlines()


def test_sdxl_demo_runs_the_whole_loop_with_validation_and_fidelity(demo):
    from lib_controlnet.models import inspect_model

    out, lines = demo
    exported = Path(lines[-2].split("exported: ", 1)[1])
    assert exported == out / "models" / "demo-shapes-sdxl.safetensors" and exported.is_file()
    with safe_open(str(exported), "pt") as handle:
        assert "control_model.label_emb.0.0.weight" in handle.keys()
        fidelity_metadata = json.loads(handle.metadata()["controlnet_studio.fidelity"])
    assert inspect_model(exported).base.startswith("sdxl")
    assert "SDXL-shaped" in (out / "report.md").read_text()
    for kind in ("condition", "untrained", "trained"):
        assert len(list((out / "generated").glob(f"{kind}-*.png"))) == 1
    # the fidelity figure, as SD1.5 training writes it: untrained round 0, then the trained one
    history = json.loads((out / "training" / "fidelity.json").read_text())
    assert history["score"] == "edge_f1" and history["module"] == "canny" and history["samples"] == 1
    assert [step for step, _ in history["rounds"]] == [0, 1] and fidelity_metadata["rounds"] == history["rounds"]
    assert all(0.0 <= value <= 1.0 for _, value in history["rounds"])
    report = (out / "training" / "report.md").read_text()
    assert "## Control fidelity" in report and "## Validation" in report
    assert (out / "training" / "validation_grid.png").is_file()


def test_sdxl_validation_image_equals_diffusers_sdxl_controlnet_pipeline(demo):
    """The validation image of step 1 is what StableDiffusionXLControlNetPipeline draws with the step-1 ControlNet,
    the prompt, the condition, UniPC and the validation seed (an empty negative prompt: zeros, as SDXL does)."""
    from diffusers import ControlNetModel, StableDiffusionXLControlNetPipeline, UniPCMultistepScheduler

    from lib_controlnet.train.base import load_base

    out, _ = demo
    config = json.loads((out / "training" / "train_config.json").read_text())
    base = load_base(config["base"])
    controlnet = ControlNetModel.from_pretrained(str(out / "training" / "checkpoint-1" / "controlnet"))
    pipe = StableDiffusionXLControlNetPipeline(
        vae=base.vae, text_encoder=base.text_encoder, text_encoder_2=base.text_encoder_2, tokenizer=base.tokenizer,
        tokenizer_2=base.tokenizer_2, unet=base.unet, controlnet=controlnet, add_watermarker=False,
        scheduler=UniPCMultistepScheduler.from_config(base.noise_scheduler.config))
    pipe.set_progress_bar_config(disable=True)
    expected = pipe(config["validation_prompts"][0], image=Image.open(config["validation_images"][0]),
                    num_inference_steps=SAMPLE_STEPS, height=64, width=64,
                    generator=torch.Generator().manual_seed(config["validation_seed"])).images[0]
    written = out / "training" / "validation" / "step-000001" / "00.png"
    difference = np.abs(np.asarray(Image.open(written)).astype(int) - np.asarray(expected).astype(int))
    assert difference.max() <= 1
    no_control = pipe(config["validation_prompts"][0], image=Image.open(config["validation_images"][0]),
                      num_inference_steps=SAMPLE_STEPS, height=64, width=64, controlnet_conditioning_scale=0.0,
                      generator=torch.Generator().manual_seed(config["validation_seed"])).images[0]
    assert np.abs(np.asarray(no_control).astype(int) - np.asarray(expected).astype(int)).max() > 1  # it can fail


def test_evaluate_scores_an_sdxl_controlnet_on_an_sdxl_base(demo, tmp_path, capsys):
    out, _ = demo
    assert main(["evaluate", "--base", str(out / "base"), "--dataset", str(out / "dataset"), "--n", "1", "--steps", "2",
                 "--controlnet", str(out / "models" / "demo-shapes-sdxl.safetensors"),
                 "--out", str(tmp_path / "full")]) == 0
    assert "report:" in capsys.readouterr().out
    summary = json.loads((tmp_path / "full" / "report.json").read_text())
    assert summary["score"] == "edge_f1" and summary["samples"] == 1 and (tmp_path / "full" / "grid.png").is_file()
    with_model = np.asarray(Image.open(tmp_path / "full" / "images" / "00-controlnet.png")).astype(int)
    without = np.asarray(Image.open(tmp_path / "full" / "images" / "00-baseline.png")).astype(int)
    assert np.abs(with_model - without).max() > 1  # the SDXL ControlNet reached the SDXL UNet
