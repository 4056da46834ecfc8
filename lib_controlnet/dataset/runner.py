"""A build running in a background thread, for UIs: start, watch per-stage progress, cancel, collect the result.

Cancel sets an event the job checks between shards (and kills img2dataset's process group), so what is done
stays done and the next start resumes.
"""
from __future__ import annotations

import threading
from typing import Optional

from lib_controlnet.dataset.config import BuildConfig
from lib_controlnet.dataset.job import STAGES, Progress, run_build
from lib_controlnet.errors import UserError


class BackgroundBuild:
    def __init__(self):
        self._lock = threading.Lock()
        self._thread: Optional[threading.Thread] = None
        self.cancel_event = threading.Event()
        self.stages: dict[str, Progress] = {}
        self.manifest: Optional[dict] = None
        self.error: Optional[str] = None
        self.config: Optional[BuildConfig] = None

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self, config: BuildConfig) -> None:
        config.require_runnable()
        with self._lock:
            if self.running:
                raise UserError("A build is already running; cancel it or wait for it to finish.")
            self.cancel_event = threading.Event()
            self.stages, self.manifest, self.error, self.config = {}, None, None, config
            self._thread = threading.Thread(target=self._run, name="dataset-build", daemon=True)
            self._thread.start()

    def _on_progress(self, progress: Progress) -> None:
        self.stages[progress.stage] = progress

    def _run(self) -> None:
        try:
            self.manifest = run_build(self.config, progress=self._on_progress, cancel=self.cancel_event)
        except UserError as error:
            self.error = str(error)
        except Exception as error:  # a UI thread must report, not die silently
            self.error = f"{type(error).__name__}: {error}"

    def cancel(self) -> None:
        self.cancel_event.set()

    def wait(self, timeout: Optional[float] = None) -> bool:
        if self._thread is not None:
            self._thread.join(timeout)
        return not self.running

    def status_text(self) -> str:
        lines = []
        for stage in STAGES:
            progress = self.stages.get(stage)
            lines.append(progress.line() if progress else f"[{STAGES.index(stage) + 1}/{len(STAGES)} {stage}] waiting")
        if self.running and self.cancel_event.is_set():
            lines.append("cancelling ...")
        elif self.error:
            lines.append(f"stopped: {self.error}")
        elif self.manifest:
            counts = self.manifest["counts"]
            lines.append(f"done: {counts['written']} samples written, {counts['failed']} left out "
                         f"(see failures.jsonl) in {self.config.out_dir}")
        return "\n".join(lines)
