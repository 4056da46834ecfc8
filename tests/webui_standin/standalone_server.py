"""The standalone server (`python -m lib_controlnet serve`) as a real subprocess on 127.0.0.1, for the API
and browser tests, with a tiny base model and a tiny canny ControlNet on disk."""
from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parents[2]
MODEL_STEM = "control_tiny_sd15_canny"


def free_port() -> int:
    with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def make_assets(folder: Path) -> dict:
    """A diffusers base folder and a models folder holding one ldm-format canny ControlNet (random weights)."""
    from lib_controlnet import tiny_models
    from lib_controlnet.models import save_controlnet_ldm

    base = folder / "base"
    if not (base / "model_index.json").exists():
        tiny_models.save_tiny_diffusers_base(base, "sd15")
    models = folder / "models"
    save_controlnet_ldm(tiny_models.tiny_controlnet("sd15"), models / f"{MODEL_STEM}.safetensors", dtype="fp32")
    return {"base": base, "models": models}


class Server:
    def __init__(self, url: str, process: subprocess.Popen, log_path: Path):
        self.url, self.process, self.log_path = url, process, log_path

    def get(self, path, **kw):
        return requests.get(self.url + path, timeout=120, **kw)

    def post(self, path, **kw):
        return requests.post(self.url + path, timeout=300, **kw)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]

    def alive(self) -> bool:
        return self.process.poll() is None and self.get("/controlnet/version").status_code == 200


@contextlib.contextmanager
def running_server(folder: Path, assets: dict, unit_count: int = 2, timeout: float = 150.0):
    port = free_port()
    log_path = folder / f"server-{port}.log"
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", GRADIO_ANALYTICS_ENABLED="False",
               DISABLE_TELEMETRY="1", NO_ALBUMENTATIONS_UPDATE="1",
               OMP_NUM_THREADS="1")  # tiny models on a shared 2-core machine: one thread is many times faster
    command = [sys.executable, "-m", "lib_controlnet", "serve", "--host", "127.0.0.1", "--port", str(port),
               "--base", str(assets["base"]), "--models-dir", str(assets["models"]),
               "--unit-count", str(unit_count)]
    with open(log_path, "wb") as log:
        process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    server = Server(f"http://127.0.0.1:{port}", process, log_path)
    try:
        deadline = time.monotonic() + timeout
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"the server exited with {process.returncode}:\n{server.log()}")
            try:
                if requests.get(server.url + "/controlnet/version", timeout=2).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"the server did not answer within {timeout}s:\n{server.log()}")
            time.sleep(0.5)
        yield server
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
