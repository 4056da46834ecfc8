"""Test-wide set-up: offline, no telemetry, and the torchvision repair before anything imports torchvision."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("DISABLE_TELEMETRY", "1")

import lib_controlnet  # noqa: E402,F401  (repairs torchvision where needed)
