"""`accelerate launch` runs the same trainer on two CPU processes (gloo): each process writes its own random
states into the shared checkpoint, the main process exports."""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

from lib_controlnet.tiny_models import save_tiny_diffusers_base
from lib_controlnet.train import checkpoint as ckpt
from lib_controlnet.train.synthetic import write_folder_pair

ROOT = Path(__file__).resolve().parent.parent


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_accelerate_launch_two_cpu_processes(tmp_path):
    save_tiny_diffusers_base(tmp_path / "base")
    write_folder_pair(tmp_path / "data", 8, seed=5)
    out = tmp_path / "out"
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--main_process_port", str(_free_port()), "-m", "lib_controlnet", "train",
               "--dataset", str(tmp_path / "data"), "--base", str(tmp_path / "base"), "--output-dir", str(out),
               "--resolution", "64", "--train-batch-size", "1", "--max-train-steps", "3", "--checkpointing-steps", "2",
               "--learning-rate", "1e-4", "--export-dir", str(tmp_path / "models"), "--export-name", "ddp"]
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "on 2 process(es)" in done.stdout
    last = ckpt.latest_checkpoint(out)
    assert last.name == "checkpoint-3"
    assert (last / "rng-0.pt").is_file() and (last / "rng-1.pt").is_file()
    state = json.loads((last / ckpt.STATE_FILE).read_text())
    assert state["num_processes"] == 2 and len(state["losses"]) == 3
    assert (tmp_path / "models" / "ddp.safetensors").is_file()
    assert done.stdout.count("exported:") == 1  # only the main process exports and prints
