"""Checkpoints: a resumed run equals the uninterrupted one bit for bit, kill -9 while writing a checkpoint
leaves the previous one usable, and the config / data-order pieces behave."""
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from lib_controlnet.tiny_models import save_tiny_diffusers_base
from lib_controlnet.train import checkpoint as ckpt
from lib_controlnet.train.config import ConfigError, TrainConfig
from lib_controlnet.train.data import BatchPlan, open_records
from lib_controlnet.train.synthetic import write_folder_pair
from lib_controlnet.train.trainer import TrainCallbacks, Trainer

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    # The CI box has 2 cores shared by parallel jobs; one intra-op thread avoids OpenMP oversubscription stalls.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield _make_setup(tmp_path_factory)
    torch.set_num_threads(previous)


def _make_setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("train_resume")
    save_tiny_diffusers_base(root / "base")
    write_folder_pair(root / "data", 8, seed=3)
    return root


def _config(root, out, **changes):
    values = dict(dataset=str(root / "data"), base=str(root / "base"), output_dir=str(out), resolution=64,
                  train_batch_size=2, gradient_accumulation_steps=2, max_train_steps=5, learning_rate=1e-3,
                  lr_scheduler="linear", lr_warmup_steps=2, checkpointing_steps=100, proportion_empty_prompts=0.3,
                  crop="random", random_flip=True, seed=7, export_dir=str(root / "models"))
    values.update(changes)
    return TrainConfig.from_dict(values)


def test_resume_equals_uninterrupted(setup):
    # 8 samples, batch 2, accumulation 2: two steps per epoch, so the interruption at step 3 falls mid-epoch
    whole = Trainer(_config(setup, setup / "whole"), export=False)
    full = whole.run()
    assert len(full.losses) == 5

    cancel = threading.Event()

    def stop_at_three(progress):
        if progress.step == 3:
            cancel.set()

    first = Trainer(_config(setup, setup / "split"), TrainCallbacks(on_progress=stop_at_three), cancel, export=False)
    part = first.run()
    assert part.cancelled and part.steps == 3
    assert (setup / "split" / "checkpoint-3").is_dir()

    second = Trainer(_config(setup, setup / "split", resume_from="latest"), export=False)
    rest = second.run()
    assert rest.losses == full.losses  # exact float equality: same data, noise, optimizer and schedule
    trained, resumed = whole.trained_controlnet.state_dict(), second.trained_controlnet.state_dict()
    assert all(torch.equal(trained[k], resumed[k]) for k in trained)


def test_kill_during_checkpoint_write_keeps_previous(setup):
    out = setup / "killed"
    command = [sys.executable, "-m", "lib_controlnet", "train", "--dataset", str(setup / "data"),
               "--base", str(setup / "base"), "--output-dir", str(out), "--resolution", "64",
               "--train-batch-size", "2", "--max-train-steps", "400", "--checkpointing-steps", "1",
               "--checkpoints-total-limit", "2", "--no-export", "--quiet"]
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    killed_mid_write = False
    for _attempt in range(3):
        process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 120
        try:
            while time.monotonic() < deadline and process.poll() is None:
                complete = ckpt.checkpoint_dirs(out)
                temps = list(out.glob(ckpt.TMP_PREFIX + "*")) if out.is_dir() else []
                if complete and temps:
                    process.send_signal(signal.SIGKILL)
                    break
                time.sleep(0.001)
        finally:
            process.kill()
            process.wait()
        assert process.returncode != 0, process.stderr.read().decode()[-2000:]
        if list(out.glob(ckpt.TMP_PREFIX + "*")):
            killed_mid_write = True  # the half-written folder is still there: the kill hit the write
            break
    assert killed_mid_write, "could not kill the trainer while it was writing a checkpoint"

    latest = ckpt.latest_checkpoint(out)
    assert latest is not None
    state = ckpt.read_state(latest)
    assert state["global_step"] >= 1 and len(state["losses"]) == state["global_step"]
    ckpt.load_controlnet(latest)  # loads
    resumed = Trainer(_config(setup, out, train_batch_size=2, gradient_accumulation_steps=1, proportion_empty_prompts=0,
                              crop="center", random_flip=False, seed=0, learning_rate=1e-5, lr_scheduler="constant",
                              lr_warmup_steps=0, max_train_steps=state["global_step"] + 1, resume_from="latest",
                              checkpoints_total_limit=2, checkpointing_steps=1), export=False).run()
    assert resumed.steps == state["global_step"] + 1
    assert resumed.losses[:-1] == state["losses"]
    assert not list(out.glob(ckpt.TMP_PREFIX + "*"))  # the stale half-written folder was cleaned up
    assert len(ckpt.checkpoint_dirs(out)) <= 2  # keep the last K


def test_batch_plan_is_a_pure_function_of_seed_and_epoch(setup):
    config = _config(setup, setup / "plan")
    records = open_records(config)
    plan = BatchPlan.build(records, config, num_processes=2)
    assert plan.epoch_batches(0) == plan.epoch_batches(0)
    assert plan.epoch_batches(0) != plan.epoch_batches(1)
    # two processes split each global batch without overlap
    first, second = next(plan.local_batches(0, 0)), next(plan.local_batches(0, 1))
    assert not {i[0] for i in first} & {i[0] for i in second}


def test_bad_settings_get_one_sentence():
    with pytest.raises(ConfigError, match="mixed_precision"):
        TrainConfig.from_dict({"mixed_precision": "fp8"})
    with pytest.raises(ConfigError, match="Unknown training setting"):
        TrainConfig.from_dict({"learning_rat": 1})
    with pytest.raises(ConfigError, match="multiple of 8"):
        TrainConfig.from_dict({"resolution": "60"})
    assert TrainConfig.from_dict({"max_train_steps": "10", "sd_locked": "false"}).sd_locked is False
