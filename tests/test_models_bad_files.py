"""Bad files and folders: one clear sentence each (ModelFileError, a UserError), never a crash, never code run."""
import pickle
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

from lib_controlnet.errors import UserError
from lib_controlnet.models import (
    ModelFileError, diffusers_to_ldm, inspect_model, load_controlnet, save_controlnet_ldm, unet_diffusers_to_ldm,
)
from lib_controlnet.tiny_models import tiny_controlnet, tiny_unet


class WritesAFile:
    """Unpickling this object calls open(path, "w"), i.e. runs code that creates a file."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


@pytest.fixture(scope="module")
def good_file(tmp_path_factory):
    return save_controlnet_ldm(tiny_controlnet("sd15"), tmp_path_factory.mktemp("good") / "good.safetensors", "fp16")


def expect_error(path, *fragments):
    for call in (inspect_model, load_controlnet):
        with pytest.raises(ModelFileError) as caught:
            call(path)
        message = str(caught.value)
        assert isinstance(caught.value, UserError)
        assert "\n" not in message and message.endswith(".")
        for fragment in fragments:
            assert fragment in message, message
    return message


def test_empty_files(tmp_path):
    for name in ("empty.safetensors", "empty.pth"):
        (tmp_path / name).write_bytes(b"")
        expect_error(tmp_path / name, name, "empty")


def test_truncated_and_corrupt_safetensors(good_file, tmp_path):
    data = good_file.read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    expect_error(tmp_path / "cut.safetensors", "cut.safetensors", "truncated or corrupt")
    (tmp_path / "header_cut.safetensors").write_bytes(data[:100])
    expect_error(tmp_path / "header_cut.safetensors", "truncated or corrupt")
    (tmp_path / "noise.safetensors").write_bytes(bytes(range(256)) * 40)
    expect_error(tmp_path / "noise.safetensors", "truncated or corrupt")
    (tmp_path / "cut.pth").write_bytes(b"PK\x03\x04" + b"\x00" * 50)
    expect_error(tmp_path / "cut.pth", "cut.pth", "could not be read")


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_pickle_that_runs_code_is_refused(tmp_path):
    marker = tmp_path / "pwned.txt"
    torch.save({"input_hint_block.0.weight": torch.zeros(1), "payload": WritesAFile(marker)}, tmp_path / "evil.pth")
    expect_error(tmp_path / "evil.pth", "evil.pth", "could run code")
    assert not marker.exists()
    # The file really is dangerous: an unrestricted load (in another process) does create the marker.
    probe = tmp_path / "probe.txt"
    torch.save({"payload": WritesAFile(probe)}, tmp_path / "evil2.pth")
    subprocess.run([sys.executable, "-c", "import pickle, sys, torch; "
                    "torch.load(sys.argv[1], weights_only=False)", str(tmp_path / "evil2.pth")],
                   check=False, capture_output=True, timeout=120)
    assert probe.exists()
    # a plain pickle (not torch's zip format) with the same payload
    (tmp_path / "evil.ckpt").write_bytes(pickle.dumps({"x": WritesAFile(marker)}))
    expect_error(tmp_path / "evil.ckpt", "evil.ckpt")
    assert not marker.exists()


def test_folders(tmp_path):
    (tmp_path / "noconfig").mkdir()
    save_file({"x": torch.zeros(1)}, str(tmp_path / "noconfig" / "diffusion_pytorch_model.safetensors"))
    expect_error(tmp_path / "noconfig", "noconfig", "no config.json")
    (tmp_path / "noweights").mkdir()
    (tmp_path / "noweights" / "config.json").write_text("{}")
    expect_error(tmp_path / "noweights", "no diffusion_pytorch_model")
    expect_error(tmp_path / "missing.safetensors", "does not exist")


def test_not_a_controlnet(tmp_path):
    from lib_controlnet.tiny_models import tiny_vae

    save_file(tiny_vae().state_dict(), str(tmp_path / "vae.safetensors"))
    expect_error(tmp_path / "vae.safetensors", "vae.safetensors is not a ControlNet")
    (tmp_path / "notes.txt").write_text("hello")
    expect_error(tmp_path / "notes.txt", "unknown file type")


def test_sd_checkpoint_without_control_weights(tmp_path):
    save_file(unet_diffusers_to_ldm(tiny_unet("sd15").state_dict(), prefix="model.diffusion_model."),
              str(tmp_path / "v1-5-pruned.safetensors"))
    expect_error(tmp_path / "v1-5-pruned.safetensors", "Stable Diffusion checkpoint without ControlNet weights")


def test_known_unsupported_types_are_named(tmp_path):
    from diffusers import T2IAdapter

    adapter = T2IAdapter(in_channels=3, channels=[32, 64], num_res_blocks=1, downscale_factor=8)
    save_file(adapter.state_dict(), str(tmp_path / "t2iadapter_canny.safetensors"))
    expect_error(tmp_path / "t2iadapter_canny.safetensors", "T2I-Adapter")

    lora = {"lora_controlnet": torch.zeros(1), "input_blocks.1.1.proj_in.down": torch.zeros(4, 32),
            "input_blocks.1.1.proj_in.up": torch.zeros(32, 4), "input_hint_block.0.weight": torch.zeros(16, 3, 3, 3)}
    save_file(lora, str(tmp_path / "control-lora-canny-rank128.safetensors"))
    expect_error(tmp_path / "control-lora-canny-rank128.safetensors", "Control-LoRA")

    torch.save({"image_proj": {"proj.weight": torch.zeros(8, 4)}, "ip_adapter": {"1.to_k_ip.weight": torch.zeros(4, 4)}},
               tmp_path / "ip-adapter_sd15.bin")
    expect_error(tmp_path / "ip-adapter_sd15.bin", "IP-Adapter")
    save_file({"image_proj.proj.weight": torch.zeros(8, 4), "ip_adapter.1.to_k_ip.weight": torch.zeros(4, 4)},
              str(tmp_path / "ip-adapter_sd15.safetensors"))
    expect_error(tmp_path / "ip-adapter_sd15.safetensors", "IP-Adapter")


def test_incomplete_controlnet(tmp_path):
    state = diffusers_to_ldm(tiny_controlnet("sd15").state_dict(), prefix="control_model.")
    state.pop("control_model.zero_convs.3.0.weight")
    save_file(state, str(tmp_path / "partial.safetensors"))
    message = str(pytest.raises(ModelFileError, load_controlnet, tmp_path / "partial.safetensors").value)
    assert "missing controlnet_down_blocks.3.weight" in message
