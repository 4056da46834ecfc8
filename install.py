"""WebUI install hook: installs what requirements.txt lists and the WebUI's venv lacks, and nothing more.

Four rules, each for a way an extension installer breaks a WebUI:
- Every package the WebUI already has (torch, torchvision, numpy, gradio, ...) is held at the installed version,
  so pip can add our dependencies but never swap the user's torch or break the WebUI's pins.
- One OpenCV. opencv-python, opencv-python-headless and the two contrib builds all install the same `cv2/`
  folder; with two of them installed, uninstalling either one deletes files of the other and `import cv2`
  breaks. Any installed OpenCV distribution satisfies our cv2 requirement (and is held), and a dependency's
  wish for another one (controlnet-aux and img2dataset ask for the headless build) is left out.
- One onnxruntime likewise: an installed GPU (or DirectML, OpenVINO, ...) build satisfies our onnxruntime
  requirement and is held, never joined by the CPU build, which would overwrite its files.
- Nothing the extension never imports. img2dataset declares wandb (and through it sentry-sdk and GitPython)
  for a logging option we never turn on; those telemetry clients stay out of the user's venv.

How: pip resolves the missing requirements with `--dry-run --report`, the plan keeps what the requirements
reach without passing through a left-out distribution, and pip installs exactly those versions with
`--no-deps`. Run as a script it installs; `plan_install()` only decides (tests drive it in a throwaway venv).
"""
from __future__ import annotations

import importlib.metadata
import json
import os
import sys
import tempfile
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

HERE = Path(__file__).resolve().parent
# Packages the WebUI owns: held at the installed version while we install ours.
HOST_OWNED = ("torch", "torchvision", "numpy", "gradio", "fastapi", "httpx", "pydantic", "transformers",
              "accelerate", "safetensors", "Pillow", "huggingface_hub", "protobuf", "open-clip-torch")
# Distributions that all install the same cv2/ package: any one of them is OpenCV.
OPENCV = ("opencv-python", "opencv-python-headless", "opencv-contrib-python", "opencv-contrib-python-headless")
# Builds of one importable package under other names (GPU, DirectML, OpenVINO, ...): an installed one satisfies
# the requirement and is held; adding the plain build would overwrite its files (a CUDA onnxruntime-gpu, which
# face-swap and background-removal extensions install, would silently turn into the CPU build).
SAME_PACKAGE = {"onnxruntime": ("onnxruntime-gpu", "onnxruntime-directml", "onnxruntime-openvino",
                                "onnxruntime-rocm", "onnxruntime-silicon")}
# Declared by a dependency, imported by no code path of ours. wandb: img2dataset imports it at module level but
# calls it only with enable_wandb=True, which we never pass (dataset/engine.py stands in for an absent one).
NEVER_IMPORTED = ("wandb",)


def installed() -> dict[str, str]:
    """{canonical name: version} of every distribution this interpreter sees."""
    found = {}
    for dist in importlib.metadata.distributions():
        name = dist.metadata["Name"]
        if name:
            found.setdefault(canonicalize_name(name), dist.version)
    return found


def read_requirements(path: Path) -> list[Requirement]:
    lines = (line.split("#", 1)[0].strip() for line in path.read_text().splitlines())
    return [Requirement(line) for line in lines if line]


def installed_opencv(have: dict[str, str]) -> str | None:
    return next((name for name in OPENCV if name in have), None)


def installed_build(name: str, have: dict[str, str]) -> str | None:
    """The installed other build of `name` (SAME_PACKAGE), if any."""
    return next((build for build in SAME_PACKAGE.get(name, ()) if build in have), None)


def missing_requirements(requirements: list[Requirement], have: dict[str, str]) -> list[Requirement]:
    missing = []
    for requirement in requirements:
        name = canonicalize_name(requirement.name)
        if name in OPENCV and installed_opencv(have):
            continue  # any OpenCV distribution provides cv2; a second one would share (and later break) cv2/
        if installed_build(name, have):
            continue
        version = have.get(name)
        if version is None or (requirement.specifier and not requirement.specifier.contains(version, prereleases=True)):
            missing.append(requirement)
    return missing


def host_constraints(have: dict[str, str]) -> list[str]:
    names = [canonicalize_name(n) for n in HOST_OWNED]
    opencv = installed_opencv(have)
    if opencv:
        names.append(opencv)  # the WebUI's OpenCV stays the one it installed
    names += [build for builds in SAME_PACKAGE.values() for build in builds if build in have]
    lines = [f"{name}=={have[name]}" for name in names if name in have]
    if "numpy" not in have:
        lines.append("numpy<2")
    return lines


def left_out(have: dict[str, str], requirements: list[Requirement]) -> set[str]:
    """Distributions no plan installs: the OpenCV builds other than the one present (or, with none, the one
    requirements.txt names), and what we never import."""
    keep = installed_opencv(have) or next((canonicalize_name(r.name) for r in requirements
                                           if canonicalize_name(r.name) in OPENCV), OPENCV[1])
    others = {name for name in SAME_PACKAGE if installed_build(name, have)}
    return {name for name in OPENCV if name != keep} | set(NEVER_IMPORTED) | others


def installed_requires(name: str) -> list[str]:
    try:
        return importlib.metadata.distribution(name).requires or []
    except importlib.metadata.PackageNotFoundError:
        return []


def select(report: dict, roots: list[Requirement], excluded: set[str], requires_of=installed_requires) -> list[str]:
    """`name==version` of every distribution in pip's install report that the roots reach through the
    dependency graph without passing through an excluded one. The walk goes on through installed
    distributions (`requires_of`), as pip's resolver does: a dependency they lack is pip's to add."""
    items = {canonicalize_name(item["metadata"]["name"]): item for item in report.get("install", [])}
    chosen: set[str] = set()
    seen: set[tuple[str, frozenset]] = set()
    todo = [(canonicalize_name(r.name), frozenset(r.extras)) for r in roots]
    while todo:
        name, extras = todo.pop()
        if name in excluded or (name, extras) in seen:
            continue
        seen.add((name, extras))
        item = items.get(name)
        if item is not None:
            chosen.add(name)
        for line in (item["metadata"].get("requires_dist") or []) if item else requires_of(name):
            requirement = Requirement(line)
            environments = [{"extra": extra} for extra in sorted(extras)] or [{"extra": ""}]
            if requirement.marker is None or any(requirement.marker.evaluate(env) for env in environments):
                todo.append((canonicalize_name(requirement.name), frozenset(requirement.extras)))
    return [f"{name}=={items[name]['metadata']['version']}" for name in sorted(chosen)]


def run_pip(args: str, desc: str) -> None:
    try:
        import launch  # the WebUI's own installer, with its index settings and logging

        launch.run_pip(args, desc)
    except ImportError:
        import shlex
        import subprocess

        subprocess.check_call([sys.executable, "-m", "pip", *shlex.split(args)])


def plan_install(requirements_file: Path = HERE / "requirements.txt") -> tuple[list[str], list[str]]:
    """-> (pip's install arguments, constraint lines); empty arguments when nothing is missing."""
    have = installed()
    requirements = read_requirements(requirements_file)
    missing = missing_requirements(requirements, have)
    constraints = host_constraints(have)
    if not missing:
        return [], constraints
    with tempfile.TemporaryDirectory(prefix="controlnet-studio-install-") as tmp:
        constraints_file = Path(tmp) / "constraints.txt"
        constraints_file.write_text("\n".join(constraints) + "\n")
        report_file = Path(tmp) / "report.json"
        quoted = " ".join(f'"{r}"' for r in missing)
        run_pip(f'install --dry-run --quiet --report "{report_file}" -c "{constraints_file}" {quoted}',
                "ControlNet Studio: resolving requirements")
        if not report_file.exists():  # the WebUI ran no pip (its --skip-install): install nothing either
            return [], constraints
        report = json.loads(report_file.read_text())
    return select(report, missing, left_out(have, requirements)), constraints


def main() -> None:
    pins, constraints = plan_install()
    if not pins:
        return
    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as handle:
        handle.write("\n".join(constraints) + "\n")
    try:
        quoted = " ".join(f'"{pin}"' for pin in pins)
        # --no-deps: the plan is already the whole resolved set, minus what must stay out
        run_pip(f'install --no-deps -c "{handle.name}" {quoted}', f"ControlNet Studio requirements: {', '.join(pins)}")
    finally:
        os.unlink(handle.name)


if __name__ == "__main__":  # the WebUI runs this file as a script (launch_utils.run_extension_installer)
    main()
