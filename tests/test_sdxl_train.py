"""SDXL training from a single sgm file: both text encoders and pooled embeddings cached (then the encoders
leave), per-sample add_time_ids, a held-out loss clearly below the untrained ControlNet's, and an export in ldm
keys with label_emb (plus diffusers) that reloads in our loader and in diffusers with the trained loss."""
import pytest
import torch
from safetensors import safe_open

from tiny_checkpoint import write_tiny_sdxl_single_file
from lib_controlnet.train.base import load_base
from lib_controlnet.train.config import TrainConfig
from lib_controlnet.train.data import TrainDataset, collate, open_records
from lib_controlnet.train.step import heldout_loss
from lib_controlnet.train.synthetic import write_folder_pair
from lib_controlnet.train.trainer import Trainer

STEPS = 40


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("sdxl_train")
    write_tiny_sdxl_single_file(root / "sdxl.safetensors", config_dir=root / "sdxl-config")
    write_folder_pair(root / "train", 16, seed=1)
    write_folder_pair(root / "heldout", 8, seed=2)
    config = TrainConfig(dataset=str(root / "train"), base=str(root / "sdxl.safetensors"),
                         base_config=str(root / "sdxl-config"), output_dir=str(root / "out"), resolution=64,
                         max_train_steps=STEPS, train_batch_size=4, learning_rate=1e-3, checkpointing_steps=1000,
                         export_dir=str(root / "models"), export_name="squares-xl", export_dtype="fp32",
                         export_diffusers=True, cache_latents=True, cache_text_embeddings=True)
    trainer = Trainer(config)
    result = trainer.run()
    base = load_base(config.base, config.base_config)
    held = TrainDataset(open_records(config.replace(dataset=str(root / "heldout"))), config)
    batches = [collate([held[(i, 0, 64, 64)] for i in range(start, start + 4)]) for start in (0, 4)]
    yield dict(root=root, result=result, trainer=trainer, base=base, batches=batches)
    torch.set_num_threads(previous)


def test_sdxl_training_lowers_heldout_loss_and_exports_reload(trained):
    from diffusers import ControlNetModel

    from lib_controlnet.models import inspect_model, load_controlnet

    base, batches, result = trained["base"], trained["batches"], trained["result"]
    assert base.is_sdxl and base.family == "sdxl"
    assert next(base.text_encoder_2.parameters()).device.type == "cpu"
    untrained = heldout_loss(base, ControlNetModel.from_unet(base.unet), batches)
    after = heldout_loss(base, trained["trainer"].trained_controlnet, batches)
    assert after < 0.8 * untrained, (untrained, after)

    with safe_open(str(result.exported), "pt") as handle:
        keys = set(handle.keys())
    assert "control_model.label_emb.0.0.weight" in keys and "control_model.input_hint_block.0.weight" in keys
    assert inspect_model(result.exported).base.startswith("sdxl")
    reloaded = load_controlnet(result.exported, dtype=torch.float32)
    assert heldout_loss(base, reloaded, batches) == pytest.approx(after, rel=1e-4)
    from_diffusers = ControlNetModel.from_pretrained(str(result.exported_diffusers), local_files_only=True)
    assert heldout_loss(base, from_diffusers, batches) == pytest.approx(after, rel=1e-4)
    # diffusers' own single-file loader reads the ldm export with a local config. diffusers 0.31 maps no
    # label_emb for ControlNet files (its table has it for UNets only), so add_embedding stays unloaded there:
    # every other weight must be ours.
    single = ControlNetModel.from_single_file(str(result.exported), config=str(result.exported_diffusers),
                                              local_files_only=True, torch_dtype=torch.float32).state_dict()
    trained_state = trained["trainer"].trained_controlnet.state_dict()
    compared = [k for k in trained_state if not k.startswith("add_embedding.")]
    assert len(compared) > 300 and all(torch.equal(single[k], trained_state[k]) for k in compared)


def test_time_ids_follow_each_samples_crop(trained, tmp_path):
    """original size, crop top-left and target size per sample, as train_controlnet_sdxl.py computes them."""
    from PIL import Image

    from lib_controlnet.train.data import crop_pair_with_time_ids, sample_rng

    image = Image.new("RGB", (200, 100))
    _, _, ids = crop_pair_with_time_ids(image, image, (64, 64), "center", False, sample_rng(0, 0, 0))
    assert ids.tolist() == [100, 200, 0, 32, 64, 64]  # resized to 128x64, centre crop starts 32 px from the left


@pytest.mark.parametrize("size, detected", [("mid", "sdxl_mid"), ("small", "sdxl_small")])
def test_mid_and_small_controlnets_start_from_the_unet_and_export_as_released(trained, size, detected):
    """A new ControlNet at the released SDXL mid/small shapes: every tensor it has is the full copy's (so it starts
    as the UNet's encoder), and its export is recognised as that size."""
    from diffusers import ControlNetModel

    from lib_controlnet.models import inspect_model, load_controlnet, save_controlnet_ldm
    from lib_controlnet.train.controlnet_size import controlnet_from_unet

    unet = trained["base"].unet
    torch.manual_seed(0)  # from_unet draws the hint embedding at random: the same draw on both sides
    full = ControlNetModel.from_unet(unet).state_dict()
    torch.manual_seed(0)
    model = controlnet_from_unet(unet, size)
    own = model.state_dict()
    assert len(own) < len(full) and all(torch.equal(own[k], full[k]) for k in own)
    # the markers other loaders tell the released sizes apart by (diffusers' single-file loader: a level-1 attention
    # norm without transformer blocks is mid, none at all is small; ComfyUI: small has no middle transformer layer)
    large, mid_norm = "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_k.weight", "down_blocks.1.attentions.0.norm.weight"
    middle_layers = {k.split(".")[4] for k in own if k.startswith("mid_block.attentions.0.transformer_blocks.")}
    assert large not in own and "mid_block.attentions.0.norm.weight" in own
    if size == "mid":
        assert mid_norm in own and "down_blocks.2.attentions.0.transformer_blocks.0.attn1.to_k.weight" in own
        assert "down_blocks.2.attentions.0.transformer_blocks.1.attn1.to_k.weight" not in own and middle_layers == {"0"}
    else:
        assert set(model.config.down_block_types) == {"DownBlock2D"} and mid_norm not in own and not middle_layers
    path = save_controlnet_ldm(model, trained["root"] / f"{size}.safetensors", dtype="fp32")
    assert inspect_model(path).base == detected
    reloaded = load_controlnet(path, dtype=torch.float32).state_dict()
    assert all(torch.equal(reloaded[k], own[k]) for k in own)


def test_an_unknown_controlnet_size_is_refused():
    from lib_controlnet.train.config import ConfigError

    with pytest.raises(ConfigError, match="controlnet_size must be one of full, mid, small"):
        TrainConfig(controlnet_size="huge").validate()


def test_fine_tuning_an_existing_sdxl_controlnet_from_the_cli(trained, capsys):
    """`train --controlnet FILE`: training starts from the released-layout SDXL file (ldm keys with label_emb), not
    from a copy of the UNet, and exports it again as SDXL; an SD1.5 ControlNet for this base is one sentence."""
    from lib_controlnet import tiny_models
    from lib_controlnet.cli import main
    from lib_controlnet.models import inspect_model, load_controlnet, save_controlnet_ldm

    root, start = trained["root"], trained["result"].exported
    common = ["train", "--dataset", str(root / "train"), "--base", str(root / "sdxl.safetensors"), "--base-config",
              str(root / "sdxl-config"), "--resolution", "64", "--max-train-steps", "1", "--train-batch-size", "2",
              "--learning-rate", "1e-9", "--fidelity-samples", "0", "--export-dir", str(root / "models"),
              "--export-dtype", "fp32", "--quiet"]
    assert main(common + ["--controlnet", str(start), "--output-dir", str(root / "tune"),
                          "--export-name", "tuned"]) == 0
    capsys.readouterr()
    tuned = root / "models" / "tuned.safetensors"
    assert inspect_model(tuned).base.startswith("sdxl")
    before, after = load_controlnet(start, dtype=torch.float32).state_dict(), load_controlnet(tuned).state_dict()
    assert before.keys() == after.keys()
    assert all(torch.allclose(after[k], before[k], atol=1e-6) for k in before)  # lr 1e-9: one step barely moves it
    unet_copy = trained["base"].unet.state_dict()
    assert not torch.allclose(after["down_blocks.0.resnets.0.conv1.weight"],
                              unet_copy["down_blocks.0.resnets.0.conv1.weight"])  # trained weights, not a new copy

    sd15 = save_controlnet_ldm(tiny_models.tiny_controlnet("sd15"), root / "sd15-cn.safetensors", dtype="fp32")
    assert main(common + ["--controlnet", str(sd15), "--output-dir", str(root / "wrong")]) == 2
    err = capsys.readouterr().err.strip()
    assert "sd15-cn.safetensors was made for another base model than this SDXL base" in err and "\n" not in err, err
    assert not (root / "wrong" / "checkpoint-1").exists()
