"""Finding annotator weight files: the user's annotator folder, under the public lllyasviel/Annotators names.

Search order for a file: <annotator dir>/<file>, <annotator dir>/<family>/<file> (the layout the other WebUI
ControlNet extension's `annotator/downloads/<family>/` uses, so that folder can be copied or pointed at), then
anywhere below the annotator dir. A missing file is a UserError naming the file and the folder, and how to allow
the download on the surface the user is on (DOWNLOAD_HINTS). A download is tried only when
settings.allow_annotator_downloads is on.
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from lib_controlnet.errors import UserError
from lib_controlnet.settings import get_settings


class AnnotatorWeightsError(UserError):
    """A weight file an annotator needs is missing or unreadable."""


# The command-line flag that turns settings.allow_annotator_downloads on (CLI commands and `serve` add it).
DOWNLOAD_FLAG = "--allow-annotator-downloads"
# How each surface lets its user allow downloads: the end of the missing-weights sentence.
DOWNLOAD_HINTS = {
    "webui": 'or turn on "Allow preprocessors to download missing weights" in Settings > ControlNet',
    "cli": f"or run the command again with {DOWNLOAD_FLAG}",
    "serve": f"or restart `python -m lib_controlnet serve` with {DOWNLOAD_FLAG}",
    "python": "or call lib_controlnet.settings.update_settings(allow_annotator_downloads=True)",
}
_surface = "cli"


def use_surface(name: str) -> None:
    """Say which surface runs (the WebUI layer, `serve`, a CLI command, a Python caller) so that the
    missing-weights sentence tells its user what they can do there."""
    global _surface
    if name not in DOWNLOAD_HINTS:
        raise ValueError(f"unknown surface {name!r}; one of {', '.join(DOWNLOAD_HINTS)}")
    _surface = name


def download_hint() -> str:
    return DOWNLOAD_HINTS[_surface]


@dataclasses.dataclass(frozen=True)
class WeightFile:
    filename: str
    family: str  # sub-folder name the other extension uses
    repo: str = "lllyasviel/Annotators"
    repo_path: str = ""  # path inside the repo when it is not the bare file name
    repo_type: str = "model"  # "space" for files published in a Hugging Face Space
    sha256: str = ""  # the publisher's hash (the hub's LFS sha256), checked after a download when given


WEIGHTS: dict[str, WeightFile] = {w.filename: w for w in (
    WeightFile("ControlNetHED.pth", "hed"),
    WeightFile("table5_pidinet.pth", "pidinet"),
    WeightFile("7_model.pth", "TEED", repo="bdsqlsz/qinglong_controlnet-lllite", repo_path="Annotators/7_model.pth"),
    WeightFile("mlsd_large_512_fp32.pth", "mlsd"),
    WeightFile("sk_model.pth", "lineart"),
    WeightFile("sk_model2.pth", "lineart"),
    WeightFile("netG.pth", "lineart_anime"),
    WeightFile("erika.pth", "manga_line"),
    WeightFile("dpt_hybrid-midas-501f0c75.pt", "midas"),
    WeightFile("res101.pth", "leres"),
    WeightFile("latest_net_G.pth", "leres"),
    WeightFile("ZoeD_M12_N.pt", "zoedepth"),
    WeightFile("scannet.pt", "normal_bae"),
    WeightFile("body_pose_model.pth", "openpose"),
    WeightFile("hand_pose_model.pth", "openpose"),
    WeightFile("facenet.pth", "openpose"),
    WeightFile("yolox_l.onnx", "openpose", repo="yzd-v/DWPose"),
    WeightFile("dw-ll_ucoco_384.onnx", "openpose", repo="yzd-v/DWPose"),
    WeightFile("rtmpose-m_ap10k_256.onnx", "openpose", repo="hr16/UnJIT-DWPose"),
    WeightFile("ControlNetLama.pth", "lama"),
    WeightFile("UNet.pth", "anime_face_segment", repo="bdsqlsz/qinglong_controlnet-lllite",
               repo_path="Annotators/UNet.pth"),
    # Segmentation runs transformers models: a folder holding config.json and the weights
    # (save_pretrained output of openmmlab/upernet-convnext-small or shi-labs/oneformer_ade20k_swin_tiny).
    WeightFile("upernet-convnext-small", "segmentation", repo="openmmlab/upernet-convnext-small"),
    WeightFile("oneformer_ade20k_swin_tiny", "oneformer", repo="shi-labs/oneformer_ade20k_swin_tiny"),
    WeightFile("oneformer_coco_swin_large", "oneformer", repo="shi-labs/oneformer_coco_swin_large"),
    # Depth Anything v1: the checkpoints in the authors' Space; v2: the authors' model repos, and the .safetensors
    # copies the other WebUI ControlNet extension downloads (found when present, never downloaded here)
    *(WeightFile(f"depth_anything_{size}14.pth", "depth_anything", repo="LiheYoung/Depth-Anything",
                 repo_path=f"checkpoints/depth_anything_{size}14.pth", repo_type="space")
      for size in ("vitl", "vitb", "vits")),
    *(WeightFile(f"depth_anything_v2_{size}.pth", "depth_anything_v2", repo=f"depth-anything/Depth-Anything-V2-{name}")
      for size, name in (("vitl", "Large"), ("vitb", "Base"), ("vits", "Small"))),
    *(WeightFile(f"depth_anything_v2_{size}.safetensors", "depth_anything_v2",
                 repo="MackinationsAi/Depth-Anything-V2_Safetensors") for size in ("vitl", "vitb", "vits")),
    WeightFile("dsine.pt", "normal_dsine", repo="bdsqlsz/qinglong_controlnet-lllite", repo_path="Annotators/dsine.pt"),
)}


def annotator_dir() -> Path:
    return Path(os.path.expanduser(str(get_settings().annotator_models_path)))


def _search(root: Path, spec: WeightFile) -> Path | None:
    for candidate in (root / spec.filename, root / spec.family / spec.filename):
        if candidate.exists():
            return candidate
    if root.is_dir():
        for candidate in root.rglob(spec.filename):
            return candidate
    return None


def _download(spec: WeightFile, root: Path) -> Path:
    target = root / spec.family
    if not spec.filename.endswith((".pth", ".pt", ".safetensors", ".onnx", ".bin", ".ckpt")):
        return _download_folder(spec, root)
    from annotators import download

    url = download.file_url(spec.repo, spec.repo_path or spec.filename, spec.repo_type)
    try:
        return download.download(url, target / spec.filename, spec.sha256)
    except download.DownloadError as error:
        raise AnnotatorWeightsError(str(error)) from None


def _download_folder(spec: WeightFile, root: Path) -> Path:
    """A transformers model folder (segmentation): huggingface_hub's snapshot_download fetches its files."""
    import huggingface_hub  # only here: most runs never download

    target = root / spec.family
    target.mkdir(parents=True, exist_ok=True)
    try:
        return Path(huggingface_hub.snapshot_download(spec.repo, local_dir=target / spec.filename))
    except Exception as error:  # network, offline mode, missing repo: all end the same way for the user
        raise AnnotatorWeightsError(
            f"Could not download {spec.filename} from {spec.repo} ({type(error).__name__}); "
            f"download it by hand into {target}."
        ) from None


PICKLE_SUFFIXES = (".pth", ".pt", ".ckpt", ".bin")
_checked: set = set()  # (path, size, mtime) of pickles seen to hold only weights


def _only_weights(path: Path, spec: WeightFile, where: str) -> Path:
    """controlnet-aux unpickles these files with its own torch.load, which runs any code a pickle holds where torch
    is older than 2.6 (the WebUI's venv): look first, with loading restricted to tensors, once per file version."""
    if path.suffix.lower() not in PICKLE_SUFFIXES or not path.is_file():
        return path
    stat = path.stat()
    key = (str(path), stat.st_size, stat.st_mtime_ns)
    if key not in _checked:
        from lib_controlnet.models import ModelFileError, check_pickled_weights

        try:
            check_pickled_weights(path, advice=f"replace {path} with the {spec.filename} published in {where} "
                                               "on Hugging Face")
        except ModelFileError as error:
            raise AnnotatorWeightsError(str(error)) from None
        _checked.add(key)
    return path


def find_weight(filename: str, label: str = "this preprocessor") -> Path:
    """The path of a weight file (or model folder), or an AnnotatorWeightsError saying where to put it."""
    spec = WEIGHTS.get(filename) or WeightFile(filename, "")
    root = annotator_dir()
    where = spec.repo + (f" ({spec.repo_path})" if spec.repo_path else "")
    found = _search(root, spec)
    if found is not None:
        return _only_weights(found, spec, where)
    if get_settings().allow_annotator_downloads:
        return _only_weights(_download(spec, root), spec, where)
    raise AnnotatorWeightsError(
        f"The {label} preprocessor needs the weight file {spec.filename}: put it in {root} "
        f"(it is published in {where} on Hugging Face), {download_hint()}."
    )


def find_first(filenames, label: str) -> Path:
    """The first of `filenames` (alternatives, preferred first) found in the annotator folder; else the first
    one, downloaded where allowed (find_weight)."""
    root = annotator_dir()
    for name in filenames:
        spec = WEIGHTS.get(name) or WeightFile(name, "")
        found = _search(root, spec)
        if found is not None:
            return _only_weights(found, spec, spec.repo)
    try:
        return find_weight(filenames[0], label)
    except AnnotatorWeightsError as error:
        if len(filenames) < 2:
            raise
        others = ", ".join(filenames[1:])
        raise AnnotatorWeightsError(f"{error} Any of {others} works too.") from None
