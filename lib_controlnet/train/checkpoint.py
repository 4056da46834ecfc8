"""Training checkpoints: written atomically, the last K kept, and everything an exact resume needs.

A checkpoint is a folder `checkpoint-<step>` holding
    controlnet/              the ControlNet as a diffusers folder (config.json + safetensors)
    unet_trained.safetensors the UNet decoder weights, only when sd_locked is off
    optimizer.pt             optimizer state (tensors and numbers only: loads with weights_only=True)
    lr_scheduler.pt          learning-rate scheduler state
    scaler.pt                fp16 gradient scaler state, when there is one
    rng-<process>.pt         python, numpy, torch (CPU, CUDA) and noise-generator states of each process
    trainer_state.json       step, epoch, position in the epoch's batch plan, loss history, config
It is first written to `.tmp-checkpoint-<step>` and then renamed in one `os.replace`, so a crash or kill -9
while writing leaves the previous checkpoints as they were.
(Accelerate's save_state/load_state are not used: accelerate 0.21 unpickles RNG states with torch.load
defaults that torch >= 2.6 refuses, and it writes in place, not atomically.)
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch

from lib_controlnet.errors import UserError

PREFIX = "checkpoint-"
TMP_PREFIX = ".tmp-checkpoint-"
STATE_FILE = "trainer_state.json"


class CheckpointError(UserError):
    """A checkpoint to resume from or export cannot be used."""


def checkpoint_dirs(output_dir) -> list[Path]:
    """Complete checkpoints, oldest first."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        match = re.fullmatch(PREFIX + r"(\d+)", path.name)
        if match and (path / STATE_FILE).is_file():
            found.append((int(match.group(1)), path))
    return [path for _, path in sorted(found)]


def latest_checkpoint(output_dir) -> Path | None:
    dirs = checkpoint_dirs(output_dir)
    return dirs[-1] if dirs else None


def resolve_resume(output_dir, resume_from: str) -> Path | None:
    if not resume_from:
        return None
    if resume_from == "latest":
        return latest_checkpoint(output_dir)  # nothing yet: start fresh
    path = Path(resume_from).expanduser()
    if not (path / STATE_FILE).is_file():
        raise CheckpointError(f"{resume_from} is not a training checkpoint (it has no {STATE_FILE}).")
    return path


def remove_stale_temp(output_dir) -> None:
    """Half-written checkpoints left by a crash are of no use."""
    root = Path(output_dir)
    if root.is_dir():
        for path in root.glob(TMP_PREFIX + "*"):
            shutil.rmtree(path, ignore_errors=True)


def temp_dir(output_dir, step: int) -> Path:
    return Path(output_dir) / f"{TMP_PREFIX}{step}"


def begin(output_dir, step: int) -> Path:
    """Main process: a clean temp folder for this step's checkpoint."""
    tmp = temp_dir(output_dir, step)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def write_rng(tmp: Path, process_index: int, noise_generator: torch.Generator) -> None:
    """Every process: its own random states."""
    numpy_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": [numpy_state[0], numpy_state[1].tolist(), *numpy_state[2:]],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "noise": noise_generator.get_state(),
    }
    _save_torch(state, tmp / f"rng-{process_index}.pt")


def write_main(tmp: Path, controlnet, trained_unet_parts: dict | None, optimizer, lr_scheduler, scaler,
               trainer_state: dict) -> None:
    """Main process: weights, optimizer, scheduler and the trainer state (last: it marks completeness)."""
    controlnet.save_pretrained(str(tmp / "controlnet"), safe_serialization=True)
    if trained_unet_parts:
        from safetensors.torch import save_file

        save_file({k: v.detach().contiguous().cpu() for k, v in trained_unet_parts.items()},
                  str(tmp / "unet_trained.safetensors"))
    _save_torch(optimizer.state_dict(), tmp / "optimizer.pt")
    _save_torch(lr_scheduler.state_dict(), tmp / "lr_scheduler.pt")
    if scaler is not None:
        _save_torch(scaler.state_dict(), tmp / "scaler.pt")
    (tmp / STATE_FILE).write_text(json.dumps(trainer_state), encoding="utf-8")


def commit(tmp: Path, output_dir, step: int, keep: int) -> Path:
    """Main process: make the checkpoint appear in one step, then drop all but the newest `keep`."""
    _fsync_tree(tmp)
    final = Path(output_dir) / f"{PREFIX}{step}"
    if final.exists():  # the same step saved again (e.g. the last step): replace it
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_dir(Path(output_dir))
    for old in checkpoint_dirs(output_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


# ---------------------------------------------------------------------------------------------- loading
def read_state(checkpoint: Path) -> dict:
    try:
        return json.loads((Path(checkpoint) / STATE_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise CheckpointError(f"Checkpoint {checkpoint} cannot be read: {error}") from None


def load_controlnet(checkpoint: Path, dtype=None):
    from diffusers import ControlNetModel

    folder = Path(checkpoint) / "controlnet"
    if not (folder / "config.json").is_file():
        raise CheckpointError(f"Checkpoint {checkpoint} holds no ControlNet (controlnet/config.json is missing).")
    return ControlNetModel.from_pretrained(str(folder), torch_dtype=dtype, local_files_only=True)


def load_trained_unet_parts(checkpoint: Path) -> dict | None:
    path = Path(checkpoint) / "unet_trained.safetensors"
    if not path.is_file():
        return None
    from safetensors.torch import load_file

    return load_file(str(path))


def load_training_state(checkpoint: Path, optimizer, lr_scheduler, scaler, process_index: int,
                        noise_generator: torch.Generator) -> None:
    """Restore optimizer, scheduler, scaler and this process's random states."""
    checkpoint = Path(checkpoint)
    optimizer.load_state_dict(_load_torch(checkpoint / "optimizer.pt"))
    lr_scheduler.load_state_dict(_load_torch(checkpoint / "lr_scheduler.pt"))
    if scaler is not None and (checkpoint / "scaler.pt").is_file():
        scaler.load_state_dict(_load_torch(checkpoint / "scaler.pt"))
    rng_file = checkpoint / f"rng-{process_index}.pt"
    if not rng_file.is_file():
        raise CheckpointError(f"Checkpoint {checkpoint} was written by fewer processes than this run has; "
                              "resume with the same number of processes.")
    state = _load_torch(rng_file)
    python_state = state["python"]
    random.setstate((python_state[0], tuple(python_state[1]), python_state[2]))
    np.random.set_state((state["numpy"][0], np.array(state["numpy"][1], dtype=np.uint32), *state["numpy"][2:]))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    noise_generator.set_state(state["noise"])


def _save_torch(obj, path: Path) -> None:
    torch.save(obj, str(path))


def _load_torch(path: Path):
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as error:
        raise CheckpointError(f"Checkpoint file {path} cannot be read: {error}") from None


def _fsync_tree(root: Path) -> None:
    for path in sorted(root.rglob("*")):
        if path.is_file():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
    _fsync_dir(root)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(str(path), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems do not sync folders
    finally:
        os.close(fd)
