"""A training run in a background thread, with the state a UI polls: progress, loss history, messages,
validation images, the result or the error. One run at a time per runner."""
from __future__ import annotations

import threading
import time
import traceback

from lib_controlnet.errors import UserError
from lib_controlnet.train.config import TrainConfig


class TrainingBusy(UserError):
    """A training run is already going."""


class BackgroundTraining:
    def __init__(self, base_provider=None):
        self.base_provider = base_provider  # (TrainConfig) -> BaseModel, e.g. the WebUI's loaded checkpoint
        self.lock = threading.Lock()
        self.thread: threading.Thread | None = None
        self.cancel_event = threading.Event()
        self._reset()

    def _reset(self) -> None:
        self.progress = None
        self.series: dict[str, dict[int, float]] = {}  # metric name -> {step: value}; "loss" and Progress.metrics
        self.messages: list[str] = []
        self.validation: list = []  # [(step, [(prompt, image, path)])]
        self.result = None
        self.error: str | None = None
        self.started = time.monotonic()

    @property
    def running(self) -> bool:
        return self.thread is not None and self.thread.is_alive()

    def start(self, config: TrainConfig, use_base_provider: bool = False) -> None:
        with self.lock:
            if self.running:
                raise TrainingBusy("A training run is already going; cancel it or wait for it to finish.")
            self._reset()
            self.cancel_event = threading.Event()
            self.thread = threading.Thread(target=self._run, args=(config, use_base_provider), daemon=True,
                                           name="controlnet-train")
            self.thread.start()

    def cancel(self) -> None:
        self.cancel_event.set()

    def wait(self, timeout: float | None = None) -> None:
        if self.thread:
            self.thread.join(timeout)

    def _run(self, config: TrainConfig, use_base_provider: bool) -> None:
        from lib_controlnet.train.trainer import TrainCallbacks, Trainer

        callbacks = TrainCallbacks(on_progress=self._on_progress, on_validation=self._on_validation,
                                   on_message=self.messages.append)
        try:
            base = self.base_provider(config) if (use_base_provider and self.base_provider) else None
            self.result = Trainer(config, callbacks, self.cancel_event, base=base).run()
        except UserError as error:
            self.error = str(error)
        except Exception as error:  # a bug must not kill the UI; show it and keep the log
            self.error = f"Training failed: {error}"
            self.messages.append(traceback.format_exc())

    @property
    def losses(self) -> list[float]:
        return list(self.series.get("loss", {}).values())

    def _on_progress(self, progress) -> None:
        self.progress = progress
        for name, value in {"loss": progress.loss, **progress.metrics}.items():
            if value is not None:
                self.series.setdefault(str(name), {})[progress.step] = float(value)

    def _on_validation(self, step: int, images: list) -> None:
        self.validation.append((step, images))

    def status_text(self) -> str:
        lines = []
        if self.progress:
            p = self.progress
            lines.append(f"step {p.step}/{p.total_steps}  loss {p.loss:.5f}  lr {p.lr:.2e}  epoch {p.epoch}  "
                         f"elapsed {p.elapsed_s:.0f}s  ETA {p.eta_s:.0f}s")
        elif self.running:
            lines.append("preparing (loading the dataset and the base model)...")
        if self.result is not None:
            state = "cancelled" if self.result.cancelled else "finished"
            lines.append(f"{state} after {self.result.steps} steps; checkpoint {self.result.checkpoint}")
            if self.result.report:
                lines.append(f"report: {self.result.report}")
        if self.error:
            lines.append(f"error: {self.error}")
        lines += self.messages[-6:]
        return "\n".join(lines)

    def fraction(self) -> float:
        if not self.progress:
            return 0.0
        return self.progress.step / max(1, self.progress.total_steps)
