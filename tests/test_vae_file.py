"""A user-given VAE file (`--vae`, the `vae` training setting): ldm keys as sdxl_vae.safetensors / sdxl-vae-fp16-fix
ship them and diffusers keys (old attention names too) load to the weights diffusers' own loader reads; `generate
--vae` decodes with it exactly as diffusers' SDXL pipeline with that VAE; the Train tab passes it (and the ControlNet
size) to training, which takes it as fp16-safe (it runs in the training precision, the stock SDXL VAE stays fp32);
other files get one sentence."""
import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from tiny_checkpoint import _ldm_vae, write_tiny_sdxl_single_file
from lib_controlnet.cli import main

pytestmark = pytest.mark.usefixtures("one_torch_thread")
PROMPT, STEPS = "a red house", 2


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("vae")
    write_tiny_sdxl_single_file(root / "sdxl.safetensors", config_dir=root / "sdxl-config")
    save_file({k: v.contiguous() for k, v in _ldm_vae(seed=5).items()}, str(root / "fixed-vae-ldm.safetensors"))
    return root


def _reference_vae(files):
    """diffusers' own single-file loader on the ldm file, with the base's VAE config."""
    from diffusers import AutoencoderKL

    return AutoencoderKL.from_single_file(str(files / "fixed-vae-ldm.safetensors"),
                                          config=str(files / "sdxl-config" / "vae"), local_files_only=True)


def test_ldm_and_diffusers_vae_files_load_as_diffusers_reads_them(files):
    from lib_controlnet.base_model import load_pipeline
    from lib_controlnet.vae_file import load_vae_file

    stock = load_pipeline(files / "sdxl-config").vae
    reference = _reference_vae(files).state_dict()
    ours = load_vae_file(files / "fixed-vae-ldm.safetensors", stock)
    assert ours.config.force_upcast is False and ours.config.scaling_factor == stock.config.scaling_factor
    assert ours.state_dict().keys() == reference.keys()
    assert all(torch.equal(ours.state_dict()[k], reference[k]) for k in reference)
    assert not torch.equal(ours.state_dict()["decoder.conv_out.weight"], stock.state_dict()["decoder.conv_out.weight"])
    # the same weights in diffusers layout, with the attention names older diffusers files carry
    old_names = {k.replace(".to_q.", ".query.").replace(".to_k.", ".key.").replace(".to_v.", ".value.")
                 .replace(".to_out.0.", ".proj_attn."): v for k, v in reference.items()}
    assert any(".query." in k for k in old_names)
    save_file(old_names, str(files / "fixed-vae-diffusers.safetensors"))
    again = load_vae_file(files / "fixed-vae-diffusers.safetensors", stock).state_dict()
    assert all(torch.equal(again[k], reference[k]) for k in reference)


def test_generate_with_vae_equals_diffusers_sdxl_pipeline_with_that_vae(files, tmp_path):
    from diffusers import StableDiffusionXLPipeline

    from lib_controlnet.base_model import load_pipeline

    common = ["generate", "--base", str(files / "sdxl.safetensors"), "--base-config", str(files / "sdxl-config"),
              "--prompt", PROMPT, "--steps", str(STEPS), "--size", "64x64", "--seed", "3"]
    assert main(common + ["--vae", str(files / "fixed-vae-ldm.safetensors"), "--out", str(tmp_path / "vae")]) == 0
    assert main(common + ["--out", str(tmp_path / "stock")]) == 0
    ours = np.asarray(Image.open(tmp_path / "vae" / "image-0.png")).astype(int)
    stock = np.asarray(Image.open(tmp_path / "stock" / "image-0.png")).astype(int)
    parts = load_pipeline(files / "sdxl.safetensors", str(files / "sdxl-config")).components
    pipe = StableDiffusionXLPipeline(**{**parts, "vae": _reference_vae(files)})
    pipe.set_progress_bar_config(disable=True)
    expected = np.asarray(pipe(PROMPT, num_inference_steps=STEPS, width=64, height=64, guidance_scale=7.5,
                               generator=torch.Generator().manual_seed(3)).images[0]).astype(int)
    assert np.abs(ours - expected).max() <= 1 and np.abs(ours - stock).max() > 1


@pytest.mark.parametrize("kind, expected", [
    ("full checkpoint", "is a full Stable Diffusion checkpoint (it holds a UNet), not a VAE"),
    ("diffusers unet", "is a UNet, not a VAE"),
    ("ldm unet", "is a UNet, not a VAE"),
    ("controlnet", "is a ControlNet, not a VAE"),
    ("truncated", "truncated or corrupt"),
    ("other shapes", "does not fit this base model's VAE"),
])
def test_wrong_vae_file_is_one_sentence(files, tmp_path, kind, expected):
    from lib_controlnet.tiny_models import tiny_vae
    from lib_controlnet.vae_file import VaeFileError, load_vae_file

    path = tmp_path / f"{kind.replace(' ', '-')}.safetensors"
    if kind == "full checkpoint":
        path = files / "sdxl.safetensors"
    elif kind == "diffusers unet":
        save_file({"conv_in.weight": torch.zeros(4), "down_blocks.0.attentions.0.proj_in.weight": torch.zeros(4)}, str(path))
    elif kind == "ldm unet":
        save_file({"input_blocks.0.0.weight": torch.zeros(4), "time_embed.0.weight": torch.zeros(4)}, str(path))
    elif kind == "controlnet":
        save_file({"control_model.input_hint_block.0.weight": torch.zeros(4)}, str(path))
    elif kind == "truncated":
        data = (files / "fixed-vae-ldm.safetensors").read_bytes()
        path.write_bytes(data[:len(data) // 2])
    else:  # a VAE of another width (as one of another model with other channels would be)
        state = _ldm_vae(seed=5)
        state["encoder.conv_in.weight"] = torch.zeros(16, 3, 3, 3)
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    with pytest.raises(VaeFileError) as error:
        load_vae_file(path, tiny_vae())
    assert expected in str(error.value) and path.name in str(error.value) and "\n" not in str(error.value)


def test_wrong_vae_file_through_the_cli_writes_nothing(files, tmp_path, capsys):
    path = tmp_path / "unet.safetensors"
    save_file({"input_blocks.0.0.weight": torch.zeros(4, 4)}, str(path))
    code = main(["generate", "--base", str(files / "sdxl.safetensors"), "--base-config", str(files / "sdxl-config"),
                 "--prompt", "x", "--steps", "1", "--size", "64x64", "--vae", str(path),
                 "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "unet.safetensors is a UNet, not a VAE" in err and err.count("\n") == 0, err
    assert not (tmp_path / "out").exists()


def test_train_tab_passes_controlnet_size_and_vae_to_the_trainer(files, tmp_path):
    """The Train tab's Start handler with the tab's own defaults, a single-file SDXL base (the architecture comes
    from the file), the size selector on "small", the VAE field filled and bf16 (it runs on the CPU): an SDXL-small
    ControlNet is exported and the given VAE ran in bf16, where the stock SDXL VAE (force_upcast) stays fp32."""
    import gradio as gr

    from lib_controlnet.models import inspect_model
    from lib_controlnet.train.synthetic import write_folder_pair
    from lib_controlnet.ui.train_tab import FIELDS, build_train_tab

    with gr.Blocks():
        tab = build_train_tab()
    components = tab["components"]
    assert components["controlnet_size"].value == "full" and components["vae"].value == ""
    write_folder_pair(tmp_path / "data", 2, seed=1)
    values = {name: components[name].value for name in FIELDS}
    values.update(dataset=str(tmp_path / "data"), base=str(files / "sdxl.safetensors"),
                  base_config=str(files / "sdxl-config"), output_dir=str(tmp_path / "run"), resolution=64,
                  max_train_steps=1, train_batch_size=2, validation_steps=0, export_dir=str(tmp_path / "models"),
                  export_dtype="fp32", controlnet_size="small", vae=str(files / "fixed-vae-ldm.safetensors"),
                  mixed_precision="bf16")
    updates = list(tab["on_start"](False, *[values[name] for name in FIELDS]))
    runner = tab["runner"]
    assert runner.error is None, updates[-1][1]
    assert inspect_model(runner.result.exported).base == "sdxl_small"
    assert "VAE from fixed-vae-ldm.safetensors, taken as fp16-safe: it runs in bfloat16" in runner.messages
    assert str(runner.result.exported) in updates[-1][4]  # the Exported files box
    from lib_controlnet.base_model import load_pipeline
    from lib_controlnet.train.config import TrainConfig
    from lib_controlnet.train.trainer import Trainer, vae_dtype

    stock = load_pipeline(files / "sdxl-config").vae
    assert stock.config.force_upcast and vae_dtype(stock, torch.bfloat16) == torch.float32
    # a next run in the same process may pick another precision: accelerate's one state is reset
    Trainer(TrainConfig(mixed_precision="no", output_dir=str(tmp_path / "next")))._accelerator()


def test_half_precision_validation_with_the_stock_fp32_sdxl_vae(files, tmp_path):
    """Mixed precision (bf16 runs on the CPU): the UNet in bf16, the stock SDXL VAE kept in fp32 (force_upcast), the
    ControlNet as Accelerate prepares it (outputs cast to fp32). The validation image is drawn and equals the
    fp32 one closely: residuals reach the UNet in its dtype, latents reach the VAE in its own."""
    from accelerate import Accelerator
    from diffusers import ControlNetModel

    from lib_controlnet.train.base import load_base
    from lib_controlnet.train.config import TrainConfig
    from lib_controlnet.train.trainer import Trainer, vae_dtype
    from lib_controlnet.train.validation import Validator

    hint = Image.new("RGB", (64, 64), "white")
    hint.paste((0, 0, 0), (16, 16, 48, 48))
    hint.save(tmp_path / "hint.png")
    config = TrainConfig(resolution=64, validation_prompts=[PROMPT], validation_images=[str(tmp_path / "hint.png")],
                         validation_inference_steps=2, mixed_precision="bf16", output_dir=str(tmp_path / "run"))
    base = load_base(files / "sdxl.safetensors", str(files / "sdxl-config"))
    torch.manual_seed(0)
    controlnet = ControlNetModel.from_unet(base.unet)
    plain = Validator(base, config, torch.device("cpu"), torch.float32).run(controlnet, 0, tmp_path / "fp32")
    Trainer(config)._accelerator()  # the run's Accelerate state, bf16
    prepared = Accelerator(mixed_precision="bf16").prepare(controlnet)
    assert vae_dtype(base.vae, torch.bfloat16) == torch.float32
    base.unet.to(torch.bfloat16)
    base.text_encoders_to("cpu", torch.bfloat16)
    half = Validator(base, config, torch.device("cpu"), torch.bfloat16).run(prepared, 1, tmp_path / "bf16")
    assert base.vae.dtype == torch.float32 and not base.vae.decoder._forward_pre_hooks
    ours, reference = (np.asarray(images[0][1]).astype(int) for images in (half, plain))
    assert np.abs(ours - reference).mean() < 8, np.abs(ours - reference).mean()
