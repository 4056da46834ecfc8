"""img2dataset, run in a child process of its own, with our URL guard inside its download workers.

Run by path (`python .../engine.py PARAMS.json`, see download.py), never imported as part of the package:
importing `lib_controlnet` costs seconds per process (torch/torchvision repair), paid here by the child and by
every img2dataset worker. safety.py, which imports nothing of ours, is loaded from its file instead; spawned
workers re-run this file as `__mp_main__`, so they find it too.

Why a child process: img2dataset.download installs a SIGINT handler (only possible on the main thread, and it
exits 0 on Ctrl-C) and spawns worker pools; in a process group of its own the job can run from a UI thread,
cancel kills the whole group at once, and a watchdog kills the group when the parent dies, so a killed build
never leaves a downloader writing beside the resumed one.

Why a Downloader subclass: img2dataset has no hook around its fetch. Its Downloader object is pickled into each
worker, so a subclass carries our fetch policy there and installs the guarded urllib opener before the first
shard; everything else (resizing, retries, X-Robots-Tag, incremental resume, distributors) stays img2dataset's.
"""
import functools
import importlib
import importlib.util
import json
import os
import signal
import sys
import threading
import time
from pathlib import Path


def _absent_wandb() -> None:
    """img2dataset's logger imports wandb at its top but calls it only when enable_wandb is on, which we never
    pass, and install.py keeps that telemetry client out of the WebUI's venv. Where it is absent, a module that
    refuses every use takes its place (here and in spawned workers, which re-run this file)."""
    if "wandb" in sys.modules or importlib.util.find_spec("wandb") is not None:
        return
    import types

    def refuse(name: str):
        # AttributeError: what hasattr() and module scans (inspect, pickle) expect of a missing attribute
        raise AttributeError(f"wandb.{name}: wandb is not installed; ControlNet Studio never enables img2dataset's "
                             "wandb logging")

    module = types.ModuleType("wandb", "stands in for an absent wandb, which img2dataset imports but we never use")
    module.__getattr__ = refuse
    sys.modules["wandb"] = module


_absent_wandb()
from img2dataset.downloader import Downloader  # noqa: E402  (after the wandb stand-in)

_GUARD_MODULE = "controlnet_studio_fetch_guard"
_SAFETY_FILE = str(Path(__file__).resolve().with_name("safety.py"))
_guard_installed = False


def _guard(path: str = _SAFETY_FILE):
    """safety.py as a module, loaded from its file once per process (also in pyspark/ray executors, which
    receive GuardedDownloader pickled by value and so never run this file's top level)."""
    if _GUARD_MODULE not in sys.modules:
        spec = importlib.util.spec_from_file_location(_GUARD_MODULE, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[_GUARD_MODULE] = module
        spec.loader.exec_module(module)
    return sys.modules[_GUARD_MODULE]


class GuardedDownloader(Downloader):
    def __init__(self, *args, policy: dict, **kwargs):
        super().__init__(*args, **kwargs)
        self.policy = policy  # plain data: pickles into any worker
        self.safety_file = _SAFETY_FILE

    def __call__(self, row):
        global _guard_installed
        if not _guard_installed:
            guard = _guard(self.safety_file)
            guard.install_guard(guard.FetchPolicy(**self.policy))
            _guard_installed = True
        return super().__call__(row)


def _watch_parent(parent_pid: int) -> None:
    def watch():
        while True:
            if os.getppid() != parent_pid:
                os.killpg(os.getpgrp(), signal.SIGKILL)
            time.sleep(0.2)

    threading.Thread(target=watch, daemon=True, name="parent-watchdog").start()


def main(params_path: str) -> int:
    with open(params_path, encoding="utf-8") as handle:
        params = json.load(handle)
    _watch_parent(int(params["parent_pid"]))
    guard = _guard()
    guard.install_guard(guard.FetchPolicy(**params["policy"]))
    img2dataset_main = importlib.import_module("img2dataset.main")  # the package re-exports a `main` function
    img2dataset_main.Downloader = functools.partial(GuardedDownloader, policy=params["policy"])
    img2dataset_main.download(**params["download"])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
