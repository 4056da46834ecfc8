"""`python -m lib_controlnet models ...` run as a user runs it: a real subprocess."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lib_controlnet.models import inspect_model, load_controlnet, save_controlnet_ldm
from lib_controlnet.tiny_models import tiny_controlnet

ROOT = Path(__file__).resolve().parent.parent


def cli(*args, check_rc=0):
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONWARNINGS="ignore")
    done = subprocess.run([sys.executable, "-m", "lib_controlnet", "models", *map(str, args)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == check_rc, done.stderr
    return done


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cli")
    model = tiny_controlnet("sdxl")
    return model, save_controlnet_ldm(model, folder / "models" / "control_xl_tiny.safetensors", "fp32")


def test_list_and_info(source):
    _, path = source
    listing = cli("list", "--dir", path.parent).stdout
    assert listing.startswith("control_xl_tiny [") and str(path) in listing
    info = cli("info", path).stdout
    assert "ldm (control_model.*)" in info and "SDXL" in info and "fp32" in info
    assert f"{sum(p.numel() for p in source[0].parameters()):,}" in info


def test_convert_round_trip_is_bit_exact(source, tmp_path):
    model, path = source
    cli("convert", path, tmp_path / "xl_diffusers", "--to", "diffusers")
    assert inspect_model(tmp_path / "xl_diffusers").format == "diffusers (folder)"
    cli("convert", tmp_path / "xl_diffusers", tmp_path / "back.safetensors", "--to", "ldm")
    from safetensors.torch import load_file

    assert load_file(str(path)).keys() == load_file(str(tmp_path / "back.safetensors")).keys()
    original, back = load_file(str(path)), load_file(str(tmp_path / "back.safetensors"))
    assert all(torch.equal(original[k], back[k]) for k in original)
    from lib_controlnet.cli import main

    assert main(["models", "convert", str(tmp_path / "xl_diffusers"), str(tmp_path / "half.safetensors"), "--to",
                 "ldm", "--dtype", "fp16"]) == 0
    half = load_controlnet(tmp_path / "half.safetensors")
    assert all(torch.equal(v, model.state_dict()[k].half()) for k, v in half.state_dict().items())


def test_errors_are_one_line(source, tmp_path):
    (tmp_path / "empty.safetensors").write_bytes(b"")
    done = cli("convert", tmp_path / "empty.safetensors", tmp_path / "o.safetensors", "--to", "ldm", check_rc=2)
    assert "is empty" in done.stderr
    assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr


@pytest.mark.parametrize("args,fragment", [
    (("info", "/nonexistent/model.safetensors"), "does not exist"),
    (("convert", "{src}", "{tmp}/o.bin", "--to", "ldm"), "must be a .safetensors file"),
    (("convert", "{src}", "{tmp}/o.safetensors", "--to", "diffusers"), "must be a folder"),
    (("convert", "{src}", "{src}", "--to", "ldm"), "must differ"),
])
def test_more_errors_in_process(source, tmp_path, capsys, args, fragment):
    """The same entry point without a new interpreter each time (subprocesses cost seconds of imports)."""
    from lib_controlnet.cli import main

    values = dict(tmp=tmp_path, src=source[1])
    assert main(["models", *(a.format(**values) for a in args)]) == 2
    err = capsys.readouterr().err
    assert fragment in err and err.count("\n") == 1
