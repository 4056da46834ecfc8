"""WebUI install hook: installs what requirements.txt lists and the WebUI's venv lacks.

It pins every package the WebUI already has (torch, torchvision, numpy, gradio, ...) to the version
installed, so pip can add our dependencies but never swap the user's torch or break the WebUI's pins.
"""
from __future__ import annotations

import importlib.metadata
import sys
import tempfile
from pathlib import Path

from packaging.requirements import Requirement

HERE = Path(__file__).resolve().parent
# Packages the WebUI owns: held at the installed version while we install ours.
HOST_OWNED = ("torch", "torchvision", "numpy", "gradio", "fastapi", "httpx", "pydantic", "transformers",
              "accelerate", "safetensors", "Pillow", "huggingface_hub", "protobuf", "open-clip-torch")


def installed_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def missing_requirements(path: Path) -> list[str]:
    missing = []
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        requirement = Requirement(line)
        version = installed_version(requirement.name)
        if version is None or (requirement.specifier and version not in requirement.specifier):
            missing.append(line)
    return missing


def host_constraints() -> str:
    lines = [f"{name}=={version}" for name in HOST_OWNED if (version := installed_version(name))]
    if installed_version("numpy") is None:
        lines.append("numpy<2")
    return "\n".join(lines) + "\n"


def run_pip(args: str, desc: str) -> None:
    try:
        import launch  # the WebUI's own installer, with its index settings and logging

        launch.run_pip(args, desc)
    except ImportError:
        import shlex
        import subprocess

        subprocess.check_call([sys.executable, "-m", "pip", *shlex.split(args)])


def main() -> None:
    missing = missing_requirements(HERE / "requirements.txt")
    if not missing:
        return
    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as constraints:
        constraints.write(host_constraints())
    quoted = " ".join(f'"{req}"' for req in missing)
    run_pip(f"install -c {constraints.name} {quoted}", f"ControlNet Studio requirements: {', '.join(missing)}")


main()
