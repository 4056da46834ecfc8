"""img2dataset, run in a child process of its own, with our URL guard inside its download workers.

Why a child process: img2dataset.download installs a SIGINT handler (only possible on the main thread, and it
exits 0 on Ctrl-C) and spawns worker pools; in a process group of its own the job can run from a UI thread,
cancel kills the whole group at once, and a watchdog kills the group when the parent dies, so a killed build
never leaves a downloader writing beside the resumed one.

Why a Downloader subclass: img2dataset has no hook around its fetch. Its Downloader object is pickled into each
worker, so a subclass carries our FetchPolicy there and installs the guarded urllib opener before the first
shard; everything else (resizing, retries, X-Robots-Tag, incremental resume, distributors) stays img2dataset's.
"""
from __future__ import annotations

import functools
import json
import os
import signal
import sys
import threading
import time

from img2dataset.downloader import Downloader

from lib_controlnet.dataset.safety import FetchPolicy, install_guard

_guard_installed = False


class GuardedDownloader(Downloader):
    def __init__(self, *args, policy: FetchPolicy, **kwargs):
        super().__init__(*args, **kwargs)
        self.policy = policy

    def __call__(self, row):
        global _guard_installed
        if not _guard_installed:
            install_guard(self.policy)
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
    policy = FetchPolicy(**params["policy"])
    install_guard(policy)
    import importlib

    img2dataset_main = importlib.import_module("img2dataset.main")  # the package re-exports a `main` function

    img2dataset_main.Downloader = functools.partial(GuardedDownloader, policy=policy)
    img2dataset_main.download(**params["download"])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
