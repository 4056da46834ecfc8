"""install.py against a real throwaway venv and real pip: the venv is a WebUI 1.10.1 venv in miniature
(its torch, numpy, gradio, ... and its opencv-python, as installed distributions), the package index a folder of
wheels that carry this test environment's own metadata (names, versions, Requires-Dist), so pip resolves the
same dependency graph users get, offline and in seconds."""
from __future__ import annotations

import importlib.metadata
import os
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import install  # noqa: E402

WEBUI = [*install.HOST_OWNED, "pyyaml", "requests", "tqdm", "scipy", "scikit-image", "einops", "filelock"]


def host_dists() -> dict[str, importlib.metadata.Distribution]:
    return {canonicalize_name(d.metadata["Name"]): d for d in importlib.metadata.distributions() if d.metadata["Name"]}


def closure(roots: list[str], dists: dict) -> set[str]:
    """Every distribution the roots need in this environment, extras and markers followed."""
    seen, todo = set(), [Requirement(r) for r in roots]
    while todo:
        req = todo.pop()
        key = (canonicalize_name(req.name), frozenset(req.extras))
        if key in seen or key[0] not in dists:
            continue
        seen.add(key)
        for line in dists[key[0]].requires or []:
            dep = Requirement(line)
            if dep.marker is None or any(dep.marker.evaluate({"extra": e}) for e in (sorted(req.extras) or [""])):
                todo.append(dep)
    return {name for name, _ in seen}


def headers(dist, name: str | None = None) -> str:
    """The METADATA header block (name, version, Requires-Dist, Provides-Extra), without the long description."""
    text = dist.read_text("METADATA").split("\n\n", 1)[0]
    if name:
        text = "\n".join(f"Name: {name}" if line.startswith("Name:") else line for line in text.splitlines())
    return text + "\n"


def dist_files(name: str, version: str, metadata: str) -> dict[str, str]:
    info = f"{name.replace('-', '_')}-{version}.dist-info"
    files = {f"{info}/METADATA": metadata, f"{info}/WHEEL": "Wheel-Version: 1.0\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}
    if name in install.OPENCV:
        files["cv2/__init__.py"] = f"provider = {name!r}\n"  # every OpenCV build ships this same folder
    files[f"{info}/RECORD"] = "".join(f"{path},,\n" for path in files) + f"{info}/RECORD,,\n"
    return files


@pytest.fixture(scope="module")
def index(tmp_path_factory):
    """A wheel folder for pip (--no-index --find-links) and the tools the bare venv borrows (pip, packaging)."""
    tmp = tmp_path_factory.mktemp("install")
    dists = host_dists()
    wheels = tmp / "wheels"
    wheels.mkdir()
    names = closure([str(r) for r in install.read_requirements(ROOT / "requirements.txt")] + WEBUI, dists)
    specs = {name: (dists[name].version, headers(dists[name])) for name in names}
    headless = dists["opencv-python-headless"]
    specs["opencv-python"] = (headless.version, headers(headless, "opencv-python"))  # the WebUI's build of it
    for name, (version, metadata) in specs.items():
        with zipfile.ZipFile(wheels / f"{name.replace('-', '_')}-{version}-py3-none-any.whl", "w") as wheel:
            for path, text in dist_files(name, version, metadata).items():
                wheel.writestr(path, text)
    tools = tmp / "tools"
    tools.mkdir()
    for module in ("pip", "packaging"):
        (tools / module).symlink_to(Path(__import__(module).__file__).parent)
    return {"tmp": tmp, "wheels": wheels, "tools": tools, "specs": specs}


def webui_venv(index, folder: Path, with_opencv: bool) -> Path:
    venv.EnvBuilder(with_pip=False).create(folder)
    site = next(folder.glob("lib/python3*/site-packages"))
    present = sorted(closure(WEBUI, host_dists()))  # a WebUI venv is whole: its packages and what they need
    for name in present + (["opencv-python"] if with_opencv else []):
        version, metadata = index["specs"][name]
        for path, text in dist_files(name, version, metadata).items():
            (site / path).parent.mkdir(parents=True, exist_ok=True)
            (site / path).write_text(text)
        (site / f"{name.replace('-', '_')}-{version}.dist-info" / "INSTALLER").write_text("pip\n")
    return site


def run_installer(index, folder: Path) -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": str(index["tools"]), "PIP_NO_INDEX": "1", "PIP_FIND_LINKS": str(index["wheels"]),
           "PIP_CONFIG_FILE": os.devnull, "PIP_CACHE_DIR": str(folder / "pip-cache"),
           "PIP_DISABLE_PIP_VERSION_CHECK": "1", "PIP_NO_WARN_SCRIPT_LOCATION": "1"}
    result = subprocess.run([str(folder / "bin" / "python"), str(ROOT / "install.py")], env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return site_versions(folder)


def site_versions(folder: Path) -> dict[str, str]:
    """{name: version} of the distributions installed in a venv, read from its dist-info folders."""
    found = {}
    for info in next(folder.glob("lib/python3*/site-packages")).glob("*.dist-info"):
        lines = (info / "METADATA").read_text().split("\n\n", 1)[0].splitlines()
        field = dict(line.split(": ", 1) for line in lines if line.startswith(("Name: ", "Version: ")))
        found[canonicalize_name(field["Name"])] = field["Version"]
    return found


def check_common(after: dict, before: dict) -> None:
    for requirement in install.read_requirements(ROOT / "requirements.txt"):
        name = canonicalize_name(requirement.name)
        if name not in install.OPENCV:
            assert name in after and requirement.specifier.contains(after[name], prereleases=True), name
    for name, version in before.items():
        assert after.get(name) == version, f"{name} moved from {version} to {after.get(name)}"
    assert not {"wandb", "sentry-sdk", "gitpython"} & set(after), "telemetry was installed"
    assert {"albumentations", "webdataset", "fire", "timm"} <= set(after)  # what img2dataset and controlnet-aux run on
    assert len(set(install.OPENCV) & set(after)) == 1, sorted(set(install.OPENCV) & set(after))


def test_webui_venv_keeps_its_one_opencv_and_gets_no_telemetry(index):
    folder = index["tmp"] / "webui-venv"
    site = webui_venv(index, folder, with_opencv=True)
    held = site_versions(folder)
    after = run_installer(index, folder)
    check_common(after, held)
    assert "opencv-python" in after and (site / "cv2" / "__init__.py").read_text() == "provider = 'opencv-python'\n"


def test_venv_without_opencv_gets_the_headless_build_only(index):
    folder = index["tmp"] / "bare-venv"
    webui_venv(index, folder, with_opencv=False)
    held = site_versions(folder)
    after = run_installer(index, folder)
    check_common(after, held)
    assert "opencv-python-headless" in after


def test_the_download_engine_loads_img2dataset_in_a_venv_without_wandb(tmp_path):
    """install.py leaves wandb out; img2dataset imports it at module level, so the engine must start without it.
    The interpreter here sees this environment's site-packages minus wandb (a real absence, not a patched import)."""
    site = Path(next(p for p in sys.path if p.endswith("site-packages") and Path(p, "img2dataset").is_dir()))
    view = tmp_path / "site-packages-without-wandb"
    view.mkdir()
    for entry in site.iterdir():
        if not entry.name.lower().startswith("wandb"):
            (view / entry.name).symlink_to(entry)
    code = (
        f"import sys; sys.path.append({str(view)!r})\n"  # after the standard library, as site-packages sits
        "import importlib, importlib.util, runpy\n"
        "assert importlib.util.find_spec('wandb') is None\n"
        f"engine = runpy.run_path({str(ROOT / 'lib_controlnet' / 'dataset' / 'engine.py')!r}, run_name='engine')\n"
        "main = importlib.import_module('img2dataset.main')  # the package re-exports a main function\n"
        "assert callable(main.download) and engine['GuardedDownloader']\n"
        "try:\n    importlib.import_module('img2dataset.logger').wandb.log({})\n"
        "except AttributeError as error:\n    print('refused:', error)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run([sys.executable, "-S", "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "refused: wandb.log: wandb is not installed" in result.stdout


def test_an_installed_gpu_onnxruntime_is_held_and_never_joined_by_the_cpu_build():
    """onnxruntime-gpu (or DirectML, ...) installs the same onnxruntime/ package the CPU build does: with one
    present, our onnxruntime requirement is met, the build is held at its version, and a dependency asking for
    the CPU build does not get it."""
    requirements = install.read_requirements(ROOT / "requirements.txt")
    assert "onnxruntime" in {canonicalize_name(r.name) for r in requirements}
    bare = {canonicalize_name(r.name) for r in install.missing_requirements(requirements, {"numpy": "1.26.2"})}
    assert "onnxruntime" in bare  # a venv without any build gets the plain one
    have = {"onnxruntime-gpu": "1.17.1", "numpy": "1.26.2"}
    missing = {canonicalize_name(r.name) for r in install.missing_requirements(requirements, have)}
    assert "onnxruntime" not in missing
    assert "onnxruntime-gpu==1.17.1" in install.host_constraints(have)
    report = {"install": [
        {"metadata": {"name": "some-tool", "version": "1.0", "requires_dist": ["onnxruntime>=1.16"]}},
        {"metadata": {"name": "onnxruntime", "version": "1.26.0", "requires_dist": ["flatbuffers"]}},
        {"metadata": {"name": "flatbuffers", "version": "25.1", "requires_dist": []}}]}
    chosen = install.select(report, [Requirement("some-tool")], install.left_out(have, requirements),
                            requires_of=lambda name: [])
    assert chosen == ["some-tool==1.0"]
